"""`tokentrain generate DIR --prompt ...` and `tokentrain chat DIR`: talk to the trained model.

DIR is the export `WORK_DIR/hf`, a work dir (its `hf/`), or a hub id. `generate` prints
completions of each prompt (greedy by default: the same text on every run, the same as
transformers' `model.generate`); `chat` is a conversation on stdin, each answer streamed as
it is generated, the history sent through the tokenizer's chat template every turn. A
tokenizer without a chat template gets plain "role: text" lines, said once.
"""

from __future__ import annotations

import sys

from tokentrain.utils.dtypes import DTYPE_NAMES

TEMPLATE_NAMES = ("chatml", "internlm2")  # tools/tokenize.NAMED_TEMPLATES, named without importing numpy


def _model_arguments(p, max_new_tokens: int) -> None:
    p.add_argument("model", metavar="DIR", help="exported model folder (WORK_DIR/hf), a work dir, or a hub id")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, deterministic; >0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when visible")
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default="auto",
        help="auto: bfloat16 on a GPU that has it, float32 on CPU",
    )
    p.add_argument("--system", default="", metavar="TEXT", help="system prompt (in the chat template)")
    p.add_argument(
        "--chat-template", choices=TEMPLATE_NAMES, help="a named template instead of the tokenizer's own (or none)"
    )
    p.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own code (hub models)")
    p.add_argument("--verbose", action="store_true", help="each prompt's token count on stderr")


def register(sub, common) -> None:
    p = sub.add_parser("generate", help="complete prompts with a trained model (greedy by default)", parents=[common])
    _model_arguments(p, 128)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--file", metavar="PATH", help="prompts, one a line ('-': stdin)")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user turn through the chat template")
    p.add_argument("--jsonl", action="store_true", help="one JSON object a prompt: prompt, completion, new_tokens")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to a trained model (stdin; /reset, /exit, Ctrl-D)", parents=[common])
    _model_arguments(p, 256)
    p.set_defaults(func=cmd_chat)


class _Session:
    """The loaded model and how to prompt and sample it."""

    def __init__(self, args):
        from tokentrain.errors import ConfigError

        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
        if args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
        from tokentrain.checkpoint.safety import weights_only_everywhere
        from tokentrain.model.inference import find_model, pick_device

        weights_only_everywhere()  # before anything can load a checkpoint or a pytorch_model.bin: no code
        source = find_model(args.model)  # one line for a folder with no model, before torch loads a model
        from tokentrain.cli.train_cmd import quiet_libraries

        quiet_libraries()
        import torch

        from tokentrain.model.generation import Sampling
        from tokentrain.model.inference import load_for_inference

        self.device = pick_device(args.device)
        self.model, self.tokenizer = load_for_inference(source, self.device, args.dtype, args.trust_remote_code)
        self.path, self.verbose = args.model, args.verbose
        self.template = None
        if args.chat_template:
            from tokentrain.tools.tokenize import NAMED_TEMPLATES

            self.template = NAMED_TEMPLATES[args.chat_template]
        self.sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p)
        self.said_plain = False
        torch.manual_seed(args.seed)

    def plain_once(self, why: str) -> None:
        if not self.said_plain:
            print(f"tokentrain: {self.path}: {why}; sending plain text (--chat-template names one)", file=sys.stderr)
            self.said_plain = True

    def run(self, prompt: str, is_templated: bool, stream: bool):
        """(completion text, new token count); printed to stdout as it comes when `stream`."""
        from transformers import TextStreamer

        from tokentrain.model.generation import encode, generate_ids

        enc = encode(self.tokenizer, prompt, is_templated, self.device)
        if self.verbose:
            print(f"[prompt: {enc['input_ids'].shape[1]} tokens]", file=sys.stderr, flush=True)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        new = generate_ids(self.model, self.tokenizer, enc, self.sampling, streamer=streamer)
        return self.tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0])


def _prompts(args) -> list[str]:
    from tokentrain.errors import ConfigError

    prompts = list(args.prompt)
    if args.file:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            try:
                with open(args.file, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"--file {args.file}: not UTF-8 text (byte {e.start}); give one prompt a line"
                ) from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --file PATH (one prompt a line)")
    return prompts


def cmd_generate(args) -> int:
    import json

    from tokentrain.model.generation import build_prompt

    prompts = _prompts(args)  # a bad --file before the model loads
    s = _Session(args)
    for text in prompts:
        prompt, is_templated = text, False
        if args.chat:
            prompt, is_templated = build_prompt(s.tokenizer, text, args.system, s.template)
            if not is_templated:
                s.plain_once("no chat template (or it refused the prompt)")
        if not args.jsonl and len(prompts) > 1:
            print(f">>> {text}", flush=True)
        completion, n = s.run(prompt, is_templated, stream=not args.jsonl)
        if args.jsonl:
            print(json.dumps({"prompt": text, "completion": completion, "new_tokens": n}, ensure_ascii=False))
    return 0


def _plain_conversation(messages: list[dict]) -> str:
    """A conversation for a model without a chat template: 'role: text' lines, then the assistant's cue."""
    return "\n".join([*(f"{m['role']}: {m['content']}" for m in messages), "assistant:"])


def cmd_chat(args) -> int:
    from tokentrain.model.generation import templated

    s = _Session(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"chatting with {s.path} on {s.device} ({s.model.dtype}); /reset clears the history, /exit or Ctrl-D ends",
            file=sys.stderr,
        )
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    limit = getattr(s.model.config, "max_position_embeddings", None)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat, as Ctrl-D does
            print(file=sys.stderr)
            break
        if not line:  # Ctrl-D / end of piped input
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        turn = {"role": "user", "content": text}
        while True:
            messages = [*system, *history, turn]
            prompt = templated(s.tokenizer, messages, s.template)
            is_templated = prompt is not None
            if prompt is None:
                s.plain_once("no chat template (or it refused the conversation)")
                prompt = _plain_conversation(messages)
            size = len(s.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if not (limit and history and size + s.sampling.max_new_tokens > limit):
                break
            history = history[2:]  # the oldest exchange goes: the model has `limit` positions
            print(f"(the conversation is past {limit} positions: its oldest turn is dropped)", file=sys.stderr)
        try:
            reply, _ = s.run(prompt, is_templated, stream=True)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the conversation
            print("\n(interrupted: this turn is dropped)", file=sys.stderr)
            continue
        history += [turn, {"role": "assistant", "content": reply}]
    return 0
