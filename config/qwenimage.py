# Qwen-Image-2512 at the PromptEcho paper's settings (torchrun --nproc_per_node 8 train.py config/qwenimage.py):
# the same run as config/zimage.py with the other policy.
exec(open('config/zimage.py').read())
out_dir = 'out/qwenimage'
model = 'Qwen/Qwen-Image-2512'        # or a local diffusers directory
