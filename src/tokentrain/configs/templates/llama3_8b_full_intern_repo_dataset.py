# tokentrain config: Llama-3-8B, full fine-tune on an InternLM-repo tokenized dataset
#
# A plain Python file of settings. Change PART 1 (at least the two paths), then:
#     tokentrain train llama3_8b_full_intern_repo_dataset_copy.py --work-dir work_dirs/llama3_8b
# Every key is checked when the file is loaded: a misspelled key is an error, not a default.
# The full list of keys is in docs/trainer.md; `--cfg-options key=value` overrides any of them.

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'meta-llama/Meta-Llama-3-8B'
trust_remote_code = False

# Data
dataset_folder = '/path/to/your/dataset'
# A mixture of folders instead: set dataset_folder = None and uncomment (weights are normalised)
# datasets = [
#     dict(folder='/path/to/web', weight=0.7, name='web'),
#     dict(folder='/path/to/code', weight=0.3, name='code'),
# ]
max_length = 2048
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 1  # per device
accumulative_counts = 1  # global batch = batch_size * accumulative_counts * ranks
dataloader_num_workers = 4
max_epochs = 1
lr = 2e-05
betas = (0.9, 0.95)
weight_decay = 0.01
max_norm = 1  # grad clip
warm_up_ratio = 0.025
min_lr_ratio = 0.15  # cosine decays to lr * min_lr_ratio

# Save
save_steps = 500
save_total_limit = 2  # Maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
SYSTEM = ''
evaluation_inputs = ['Please tell me five scenic spots in Shanghai']

#######################################################################
#                     PART 2  Runtime (defaults are fine)             #
#######################################################################
seed = 1024
dtype = 'auto'  # bfloat16 autocast where the device supports it, else float32
gradient_checkpointing = True  # or 'selective': keep matmul outputs, recompute the cheap ops (faster)
compile = 'auto'  # torch.compile each decoder layer; auto: on CUDA
use_varlen_attn = None  # None: a varlen kernel on CUDA (PyTorch's own, else flash_attn's), else sdpa
log_interval = 10
