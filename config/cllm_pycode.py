# Distil the pycode target (config/train_pycode.py) on a CPU. n=32, as the authors use for code.
# python train.py config/train_pycode.py && python train_cllm.py config/cllm_pycode.py
out_dir = "out-cllm-pycode"
target_dir = "out-pycode"
dataset = "pycode"
n = 32
num_prompts = 2000
traj_max_new_tokens = 128
max_new_tokens = 128
batch_size = 8
states_per_block = 2
max_iters = 400
eval_interval = 100
val_prompts = 30
test_prompts = 100
