# The pycode target (CPython standard library functions) on a CPU (about 16 minutes on one thread of a 2-core AMD EPYC).
# python data/pycode/prepare.py && python train.py config/train_pycode.py
out_dir = "out-pycode"
dataset = "pycode"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
batch_size = 16
max_iters = 1200
learning_rate = 2e-3
min_lr = 2e-4
test_prompts = 100
max_new_tokens = 128
