"""`tokentrain plan` / `train --dry-run`: what a run will need, from the config alone.

Data (documents, tokens, samples, epochs per source), steps, the model's size, memory per GPU
per engine, checkpoint and export sizes, disk and time -- read from the config, the data's
indices and the model's config.json (the model built on the meta device: no weights, no
memory). Nothing is written and nothing is fetched from the network.
"""
