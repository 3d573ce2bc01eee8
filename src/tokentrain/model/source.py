"""Where a model comes from -- a local folder or a Hugging Face hub id -- decided before any hub call.

Every command that loads a model or tokenizer by name (train, convert, chat, generate,
tokenize, data show) asks `check_model_source` first. A local path must be a folder (with a
config.json, for a model). A hub id is only handed to transformers when it can be had: with
``HF_HUB_OFFLINE=1`` it must be in the local cache; otherwise the hub endpoint must answer a
single connect within `PROBE_SECONDS`. Without that, transformers retries each file with
back-off for about a minute and then says nothing of a local folder or the offline switch.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from tokentrain.errors import ConfigError

log = logging.getLogger(__name__)

PROBE_SECONDS = 2.0
DEFAULT_ENDPOINT = "https://huggingface.co"
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_TRUE = {"1", "on", "yes", "true"}


def check_model_source(
    path: str, what: str = "pretrained_model_name_or_path", need_config: bool = True, hub: bool = True
) -> None:
    """Raise one ConfigError line unless `path` is a usable local folder or a hub id that can be
    loaded now. `what` names the setting or flag in the message; `need_config`: a model folder
    (config.json), not only a tokenizer's; `hub=False`: a hub id is not checked (a plan loads
    nothing from it). A cached hub id with the hub unreachable switches this process (and its
    children) to offline mode, so the cache is used without retries."""
    from tokentrain.config.loader import missing_demo_model

    if hint := missing_demo_model(path):  # demo/tiny-llama outside the checkout: not a hub id
        raise ConfigError(f"{_named(what)}{hint}")
    p = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) or p.exists() or not _HUB_ID.match(path):
        _check_folder(path, p, what, need_config)
        return
    if not hub:
        return
    if offline_mode():
        if not in_cache(path):
            raise ConfigError(
                f"{_named(what)}{path!r}: not a local folder and not in the local Hugging Face cache ({hub_cache()}), "
                "and HF_HUB_OFFLINE=1 forbids downloading it: give a local model folder, or download it once "
                "with network (unset HF_HUB_OFFLINE)"
            )
        return
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT
    why = unreachable(endpoint)
    if why is None:
        return
    if in_cache(path):
        log.info("%s: the Hugging Face hub is unreachable (%s); using the local cache (HF_HUB_OFFLINE=1)", path, why)
        go_offline()
        return
    raise ConfigError(
        f"{_named(what)}{path!r}: not a local folder and the Hugging Face hub is unreachable ({endpoint}: {why}): "
        f"give a local model folder in {what}, or set HF_HUB_OFFLINE=1 to use the local cache"
    )


def _check_folder(path: str, p: Path, what: str, need_config: bool) -> None:
    from tokentrain.utils.paths import shown

    if not p.is_dir():
        raise ConfigError(
            f"{_named(what)}{shown(path)}: model folder does not exist; cannot load the tokenizer or the model"
            if not p.exists()
            else f"{_named(what)}{path!r}: not a folder; give a Hugging Face model folder"
        )
    if need_config and not (p / "config.json").is_file():
        raise ConfigError(f"{_named(what)}{path!r}: no config.json in the folder; give a Hugging Face model folder")


def _named(what: str) -> str:
    """How a message names the value: `key = ` for a config setting, `--flag ` for a flag."""
    return f"{what} " if what.startswith("-") else f"{what} = "


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) set, as huggingface_hub reads them."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def in_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds the repo's config.json (what every load reads first)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def go_offline() -> None:
    """Offline mode for this process (huggingface_hub read the variable at import) and its children."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def unreachable(endpoint: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why `endpoint` (or the proxy the environment names for it) cannot be reached, or None.
    One TCP connect, no retries; name resolution included, the whole bounded by `timeout`
    (a resolver that hangs is abandoned in its daemon thread)."""
    url = urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return f"HF_ENDPOINT {endpoint!r} names no host"
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(host):
        purl = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if purl.hostname:
            host, port = purl.hostname, purl.port or 80
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except TimeoutError:
            result.append(f"no answer in {timeout:g} s")
        except OSError as e:
            result.append(e.strerror or type(e).__name__)

    t = threading.Thread(target=connect, name="hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.1)
    return result[0] if result else f"no answer in {timeout:g} s"
