# tokentrain config: a tiny Llama (demo/tiny-llama, ~1M parameters) learns the demo chat task on CPU in minutes
#
# A plain Python file of settings. Change PART 1 (at least the two paths), then:
#     tokentrain train tiny_demo_copy.py --work-dir work_dirs/tiny_demo
# Every key is checked when the file is loaded: a misspelled key is an error, not a default.
# The full list of keys is in docs/trainer.md; `--cfg-options key=value` overrides any of them.

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'demo/tiny-llama'  # in the checkout (elsewhere: `tokentrain demo DIR` writes it)
trust_remote_code = False

# Data
# made by `tokentrain tokenize demo/data/chat.jsonl --tokenizer demo/tiny-llama --out demo_out/data`
dataset_folder = 'demo_out/data'
# A mixture of folders instead: set dataset_folder = None and uncomment (weights are normalised)
# datasets = [
#     dict(folder='/path/to/web', weight=0.7, name='web'),
#     dict(folder='/path/to/code', weight=0.3, name='code'),
# ]
max_length = 512
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 4  # per device
accumulative_counts = 1  # global batch = batch_size * accumulative_counts * ranks
dataloader_num_workers = 1
max_epochs = 1
max_iters = 300  # optimizer steps; wins over max_epochs
lr = 0.003
betas = (0.9, 0.95)
weight_decay = 0.01
max_norm = 1  # grad clip
warm_up_ratio = 0.05
min_lr_ratio = 0.15  # cosine decays to lr * min_lr_ratio

# Save
save_steps = 100
save_total_limit = 2  # Maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 100
SYSTEM = 'You are a concise assistant.'
evaluation_inputs = ['What is the capital of France?', 'What is 3 plus 4?']

#######################################################################
#                     PART 2  Runtime (defaults are fine)             #
#######################################################################
seed = 1024
dtype = 'float32'  # a model this small is overhead-bound: bf16 autocast is ~2x slower on CPU here
gradient_checkpointing = False  # True: least memory; 'selective': most of the saving, little compute
compile = 'auto'  # torch.compile each decoder layer; auto: on CUDA
use_varlen_attn = None  # None: a varlen kernel on CUDA (PyTorch's own, else flash_attn's), else sdpa
log_interval = 20
evaluation_max_new_tokens = 16
