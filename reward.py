"""
The PromptEcho reward (arXiv 2604.12652): how well a frozen VLM "echoes" the prompt.

Feed a frozen vision-language model one chat,
    user:      [image x] + q        q = "Describe this image in detail."
    assistant: p                    the prompt that generated x is the label
and score only the tokens of p:
    r(x, p) = -(1/N) sum_i log P_vlm(p_i | x, q, p_<i)
Deterministic, one forward pass, no annotation, no reward model to train.

    python reward.py --vlm DIR --image x.png --prompt "a red cube on a blue table"
prints the reward and the label tokens the VLM found least likely given the image.
"""
import argparse
import json
import math
import os
import re
import warnings

import torch
from PIL import Image

QUERY = "Describe this image in detail."                     # the paper's guiding query q
# Text-rendering variant: the label is the poster's designed text as canonical JSON (see ocr_label).
OCR_QUERY = ("Read every piece of designed text on this poster and return it as JSON with the keys "
             "main_title, subtitle, selling_points and other_text, each holding a list of strings.")
OCR_KEYS = ('main_title', 'subtitle', 'selling_points', 'other_text')
INFER_QUERY = ("Here is a text-to-image prompt: \"{prompt}\"\nHow consistent is this image with the prompt? "
               "Answer with one integer from 0 (unrelated) to 10 (every detail matches).")
MAX_BATCH = 8             # images per VLM forward
LOGITS_CHUNK = 1024       # label positions per lm_head + log-softmax call: caps the [N, vocab] logits at
                          # 1024 x 151k x 4 B = 0.6 GB (8 images x 400-token labels would be 4.8 GB at once)
# The VLM's image resolution cap. At 1024x1024 Qwen3-VL (16 px patches, 2x2 merge) makes 4096 patches
# -> 1024 image tokens in the LLM; Qwen2.5-VL (14 px, 2x2 merge) resizes to 1008^2 -> 1296 tokens.
# 512*512 costs about 4x less in both the vision tower and the LLM. Only dynamic-resolution (Qwen-VL style)
# processors take it; fixed-size ones (LLaVA's CLIP, Gemma 3's SigLIP) resize to their own size.
MAX_PIXELS = 1024 * 1024


# -----------------------------------------------------------------------------
# loading

def load_vlm(path, device='cpu', dtype=torch.float32, trust_remote_code=False):
    """A frozen HF image-text-to-text chat model and its processor from a directory (or hub id)."""
    from transformers import AutoModelForImageTextToText
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, 'config.json')):
            raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json); "
                                    "pass the folder that holds config.json and the *.safetensors weights")
    elif path.count('/') != 1 or path.startswith(('.', '/', '~')):   # no local dir and no 'org/name' hub id
        raise FileNotFoundError(f"VLM directory {path} does not exist")
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:                                      # a hub id the hub cannot give (offline, unknown)
        if os.path.isdir(path):
            raise
        raise FileNotFoundError(f"VLM directory {path} does not exist, and fetching it as a hub id failed "
                                f"({type(e).__name__}); give the path of a local transformers directory") from None
    model.to(device).eval().requires_grad_(False)
    return model, load_processor(path, trust_remote_code)


def load_processor(path, trust_remote_code=False):
    """AutoProcessor, or an image-only processor when the video half cannot load.

    Qwen-VL processors bundle a video processor that needs torchvision. Without it,
    AutoProcessor either raises or silently returns only the tokenizer. Images need no
    torchvision: build the processor from the tokenizer and the PIL image processor.
    """
    from transformers import AutoProcessor, AutoTokenizer, ProcessorMixin
    try:
        proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if isinstance(proc, ProcessorMixin) and getattr(proc, 'image_processor', None) is not None:
            return proc
    except (ImportError, OSError, ValueError, TypeError):
        pass
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    with open(os.path.join(path, 'config.json')) as f:
        model_type = json.load(f)['model_type']
    cls_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if cls_name is None or not cls_name.startswith('Qwen'):     # the fallback below is a Qwen-VL image processor
        raise ValueError(f"{path}: AutoProcessor could not load the {model_type!r} processor and the torchvision-free "
                         "fallback only builds Qwen-VL ones; install torchvision")
    ip_cfg = {}
    for name in ('preprocessor_config.json', 'processor_config.json'):      # hub files / transformers-5 saves
        if os.path.isfile(os.path.join(path, name)):
            cfg = json.load(open(os.path.join(path, name)))
            ip_cfg = cfg.get('image_processor', cfg)
            break
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        raise ImportError(f"{path}: AutoProcessor could not load (torchvision is missing) and this transformers "
                          f"({transformers.__version__}) has no PIL Qwen2-VL image processor to build one without it; "
                          "upgrade transformers (tested: 5.24)") from None
    keep = ('size', 'min_pixels', 'max_pixels', 'patch_size', 'temporal_patch_size', 'merge_size', 'image_mean', 'image_std',
            'do_resize', 'do_rescale', 'rescale_factor', 'do_normalize', 'do_convert_rgb')
    image_processor = Qwen2VLImageProcessorPil(**{k: v for k, v in ip_cfg.items() if k in keep})
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    chat_template = getattr(tokenizer, 'chat_template', None)  # the processor's own template wins, as in
    if os.path.isfile(os.path.join(path, 'chat_template.jinja')):  # transformers: .jinja, then the legacy .json
        chat_template = open(os.path.join(path, 'chat_template.jinja')).read()
    elif os.path.isfile(os.path.join(path, 'chat_template.json')):
        chat_template = json.load(open(os.path.join(path, 'chat_template.json')))['chat_template']
    return image_only_processor(getattr(transformers, cls_name), image_processor, tokenizer, chat_template)


def image_only_processor(cls, image_processor, tokenizer, chat_template):
    """An instance of processor class `cls` that holds only an image processor and a tokenizer.

    ProcessorMixin type-checks every part it declares, and the video part's base class cannot
    even be looked up without torchvision; this subclass declares just the two parts it has."""
    sub = type(cls.__name__, (cls,), {'get_attributes': classmethod(lambda c: ['image_processor', 'tokenizer'])})
    return sub(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template)


# -----------------------------------------------------------------------------
# inputs

def to_pil(images):
    """PIL list, or a float tensor [B, 3, H, W] in [0, 1] (what sample.py makes) -> list of RGB PIL images."""
    if isinstance(images, torch.Tensor):
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]                      # [B, H, W, 3] uint8
    return [im if im.mode == 'RGB' else im.convert('RGB') for im in images]


def chat_context(processor, query, label):
    """The chat text that precedes the label in the assistant turn.

    How the span is found: render the conversation with the assistant turn, render it again
    with only the user turn plus the generation prompt, and look for the label right after
    that header. Everything before the label is context (system text, image placeholder, query,
    template tokens, and e.g. the empty <think></think> block that Qwen3 thinking templates
    insert); everything after it (end-of-turn) is dropped. Which tokens are the label's is then
    decided on the tokens of context + label (label_tokens). Tests check both against the full
    chat's tokens for Qwen3-VL, Qwen2.5-VL, LLaVA and Gemma 3 templates.
    """
    msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': query}]},
            {'role': 'assistant', 'content': [{'type': 'text', 'text': label}]}]
    full = processor.apply_chat_template(msgs, tokenize=False)
    head = processor.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    at = full.find(label, len(head)) if full.startswith(head) else -1
    if at < 0:
        raise ValueError("the chat template does not place the label verbatim after the assistant header; "
                         "the reward cannot tell which tokens are the label. Use a template that renders "
                         "assistant content as is.")
    return full[:at]


def _as_list(x, n, name):
    if isinstance(x, str):
        return [x] * n
    if len(x) != n:
        raise ValueError(f"got {n} images but {len(x)} {name}; pass one {name[:-1]} per image")
    return list(x)


# -----------------------------------------------------------------------------
# the reward

@torch.no_grad()
def promptecho_reward(model, processor, images, labels, query=QUERY, return_tokens=False,
                      max_batch=MAX_BATCH, max_pixels=MAX_PIXELS):
    """-mean token cross-entropy of each label given its image and query -> float32 Tensor [B].

    images: PIL list or [B, 3, H, W] in [0, 1]; labels: list of str; query: str or one per image.
    return_tokens=True also returns, per image, a list of (token string, log-prob).
    """
    images = to_pil(images)
    labels = _as_list(labels, len(images), 'labels')
    queries = _as_list(query, len(images), 'queries')
    if any(not isinstance(l, str) or not l.strip() for l in labels):
        raise ValueError("empty label: every image needs a non-empty prompt/label to score")
    rewards, tokens = [], []
    for i in range(0, len(images), max_batch):
        r, t = _reward_chunk(model, processor, images[i:i + max_batch], labels[i:i + max_batch],
                             queries[i:i + max_batch], max_pixels, return_tokens)
        rewards.append(r)
        tokens += t
    rewards = torch.cat(rewards)
    return (rewards, tokens) if return_tokens else rewards


def image_kwargs(processor, max_pixels):
    """The resolution cap, for dynamic-resolution (Qwen-VL style) image processors; others resize to their
    own fixed size, so nothing is passed. The floor of 28 x 28 px keeps small images (the toy world's
    64 x 64) at their size instead of the checkpoint's minimum."""
    ip = getattr(processor, 'image_processor', None)
    if ip is None or getattr(ip, 'merge_size', None) is None:
        return {}
    return {'images_kwargs': {'size': {'shortest_edge': 28 * 28, 'longest_edge': max_pixels}}}


def add_specials(tokenizer, text):
    """Whether tokenizing chat text should add special tokens: not when the template already wrote the BOS
    (transformers' rule for apply_chat_template), so a Llama-style tokenizer gets its <s> exactly once."""
    bos = getattr(tokenizer, 'bos_token', None)
    return not (bos and text.startswith(bos))


def label_tokens(tokenizer, contexts, labels):
    """The label's token ids, as the label is tokenized inside the chat: the tokens of context + label,
    minus the longest prefix they share with the tokens of the context alone. With a newline before the
    label (every Qwen assistant header) that is the label tokenized alone; with a space before it
    (SentencePiece "ASSISTANT: a cat") the space's piece is scored with the label, as the chat spells it."""
    out = []
    for c, l in zip(contexts, labels):
        specials = add_specials(tokenizer, c)
        a, b = (tokenizer(t, add_special_tokens=specials)['input_ids'] for t in (c, c + l))
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        out.append(b[k:])
    return out


def model_head(model, inputs, hidden):
    """hidden [..., H] -> float32 logits as the model's own forward makes them: its output embedding, plus the
    final soft cap where the forward applies one (Gemma 2 / 4 and PaliGemma do; Gemma 3's VLM does not, whatever
    its config says). Decided once per model by comparing with its forward at the last position of a batch;
    a forward that does something else to its logits (e.g. Granite's scaling) is an error, not a wrong reward."""
    lin = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), 'final_logit_softcapping', None)
    heads = {'plain': lambda h: lin(h).float(), 'cap': lambda h: torch.tanh(lin(h).float() / cap) * cap}
    if getattr(model, '_promptecho_head', None) is None:
        try:
            want = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()   # [B, vocab]
        except TypeError:                                            # a forward without logits_to_keep
            want = model(**inputs, use_cache=False).logits[:, -1].float()
        err = {k: (f(hidden[:, -1]) - want).abs().max().item() for k, f in heads.items() if k == 'plain' or cap}
        best = min(err, key=err.get)
        if err[best] > 1e-3 * max(1.0, want.abs().max().item()):
            raise ValueError(f"{type(model).__name__}'s forward post-processes its logits in a way reward.py does not "
                             f"(max difference {err[best]:.3g} from its output embedding{' and soft cap' if cap else ''}); "
                             "the reward would be wrong")
        model._promptecho_head = best
    return heads[model._promptecho_head]


def _reward_chunk(model, processor, images, labels, queries, max_pixels, return_tokens=False):
    dev = model.device
    contexts = [chat_context(processor, q, l) for q, l in zip(queries, labels)]
    want = label_tokens(processor.tokenizer, contexts, labels)
    n_lab = [len(w) for w in want]
    # the processor expands the image placeholders (only in the context), pads on the right and adds what the
    # model needs next to input_ids (Qwen: image_grid_thw, mm_token_type_ids; Gemma3: token_type_ids; ...)
    enc = processor(text=[c + l for c, l in zip(contexts, labels)], images=[[im] for im in images], return_tensors='pt',
                    padding=True, padding_side='right', add_special_tokens=add_specials(processor.tokenizer, contexts[0]),
                    **image_kwargs(processor, max_pixels))
    if 'image_grid_thw' in enc and 'mm_token_type_ids' not in enc:   # M-RoPE would place the image tokens as text
        raise ValueError(f"{type(processor).__name__} returned no mm_token_type_ids (M-RoPE needs them to place "
                         "the image tokens); upgrade transformers (tested: 5.24)")
    ids = enc['input_ids']                                           # [B, T] right-padded
    n_all = enc['attention_mask'].sum(1).tolist()                    # real length of each row
    limit = model.config.get_text_config().max_position_embeddings
    for j, (n, k) in enumerate(zip(n_all, n_lab)):
        if n - k >= limit:
            raise ValueError(f"image {j}: the context alone ({n - k} tokens) fills the VLM's {limit}-token window; "
                             "lower max_pixels or shorten the query")
        if n > limit:                                                # decision: truncate, warn, keep training
            warnings.warn(f"label {j} has {k} tokens; with {n - k} context tokens it exceeds the VLM's "
                          f"{limit}-token context, scoring its first {limit - (n - k)} tokens only")
            n_lab[j], n_all[j] = k - (n - limit), limit
    if ids.shape[1] > limit:                                         # the label tails past the window go
        enc = {k: v[:, :limit] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == ids.shape
               and not k.startswith('pixel') else v for k, v in enc.items()}   # every per-token tensor
        ids = enc['input_ids']
    # label token k of row j sits at n_all - n_lab + k; the logit one position earlier predicts it
    rows = [j for j, k in enumerate(n_lab) for _ in range(k)]
    pos = [p for n, k in zip(n_all, n_lab) for p in range(n - k - 1, n - 1)]
    label_ids = [ids[j, n - k:n].tolist() for j, (n, k) in enumerate(zip(n_all, n_lab))]
    for j, (got, w) in enumerate(zip(label_ids, want)):
        if got != w[:len(got)]:                                      # the image expansion moved a boundary
            raise ValueError(f"image {j}: the processor's tokens at the end of the chat are not the label's "
                             f"{w[:8]}...; this processor/template pair cannot be scored")
    inputs = {k: v.to(dev, model.dtype if v.is_floating_point() else v.dtype) for k, v in enc.items() if torch.is_tensor(v)}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state  # [B, T, H], no [B, T, vocab] logits, no KV cache
    h = hidden[torch.tensor(rows, device=dev), torch.tensor(pos, device=dev)]  # [N, H] label positions only
    tgt = torch.tensor([t for l in label_ids for t in l], device=dev)
    head = model_head(model, inputs, hidden)
    logp = torch.cat([head(hc).log_softmax(-1).gather(1, tc[:, None])[:, 0]         # [n, vocab] at a time
                      for hc, tc in zip(h.split(LOGITS_CHUNK), tgt.split(LOGITS_CHUNK))])  # [N] log P(p_i | x, q, p_<i)
    B = len(images)
    row_t = torch.tensor(rows, device=dev)
    count = torch.bincount(row_t, minlength=B).float()               # N_j label tokens per row
    rew = torch.zeros(B, device=dev).index_add_(0, row_t, logp) / count  # r = (1/N) sum log P = -CE
    per_tok = []
    if return_tokens:                                                # per-token strings cost as much as the VLM
        logp_cpu = logp.cpu().tolist()                               # forward of a tiny model: only on request
        k = 0
        for ids in label_ids:
            per_tok.append([(processor.tokenizer.decode([t]), lp) for t, lp in zip(ids, logp_cpu[k:k + len(ids)])])
            k += len(ids)
    return rew.float().cpu(), per_tok


# -----------------------------------------------------------------------------
# text-rendering labels and the InferScore baseline

def ocr_label(texts):
    """Canonical JSON label for the text-rendering variant: fixed key order, lists of strings."""
    extra = set(texts) - set(OCR_KEYS)
    if extra:
        raise ValueError(f"unknown OCR keys {sorted(extra)}; allowed: {OCR_KEYS}")
    out = {k: [str(s) for s in texts.get(k, [])] for k in OCR_KEYS}
    return json.dumps(out, ensure_ascii=False, separators=(', ', ': '))


def parse_score(text):
    """The first integer 0..10 in a generated answer, else NaN (counted by the caller, never 0)."""
    m = re.search(r'(?<![\d.])(10|\d)(?:\s*/\s*10)?(?!\d|\.\d)', text)  # '3.5' is not a score
    return float(m.group(1)) if m else float('nan')


@torch.no_grad()
def generate_text(model, processor, images, texts, temperature=0.0, max_new_tokens=64, max_pixels=MAX_PIXELS):
    """One user turn per chat (its images, then its text) -> generated answers (strings).
    images: a list of image lists, one per chat; temperature 0 = greedy. Shared by InferScore, the
    eval.py judge and data_prep.py's captioner."""
    chats = [processor.apply_chat_template([{'role': 'user', 'content': [{'type': 'image'}] * len(ims) + [
        {'type': 'text', 'text': t}]}], tokenize=False, add_generation_prompt=True) for ims, t in zip(images, texts)]
    enc = processor(text=chats, images=[list(ims) for ims in images], return_tensors='pt', padding=True,
                    padding_side='left', add_special_tokens=add_specials(processor.tokenizer, chats[0]),
                    **image_kwargs(processor, max_pixels))
    enc = {k: v.to(model.device) for k, v in enc.items()}
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, **sampling)
    return [processor.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out[:, enc['input_ids'].shape[1]:]]


def infer_score(model, processor, images, prompts, temperature=0.7, max_new_tokens=16, max_batch=MAX_BATCH,
                max_pixels=MAX_PIXELS, generator_seed=0):
    """InferScore (the paper's ablation baseline): the VLM generates a 0-10 rating, which is parsed.

    Returns (scores float32 [B] with NaN for unparsable answers, the raw answers)."""
    images = to_pil(images)
    prompts = _as_list(prompts, len(images), 'prompts')
    torch.manual_seed(generator_seed)
    answers = []
    for i in range(0, len(images), max_batch):
        answers += generate_text(model, processor, [[im] for im in images[i:i + max_batch]],
                                 [INFER_QUERY.format(prompt=p) for p in prompts[i:i + max_batch]],
                                 temperature, max_new_tokens, max_pixels)
    return torch.tensor([parse_score(a) for a in answers], dtype=torch.float32), answers


# -----------------------------------------------------------------------------
# jsonl / json files (shared by train.py, eval.py and data_prep.py)

def append_jsonl(path, rows):
    """Append rows, one JSON object per line, flushed to disk (a kill loses at most the line being written)."""
    with open(path, 'a', encoding='utf-8') as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
        f.flush()
        os.fsync(f.fileno())


def write_json(obj, path):
    """Atomic JSON write (temp file + os.replace); NaN and inf (no pairs to agree on, ...) are written as null."""
    clean = lambda x: (None if isinstance(x, float) and not math.isfinite(x) else
                       {k: clean(v) for k, v in x.items()} if isinstance(x, dict) else
                       [clean(v) for v in x] if isinstance(x, (list, tuple)) else x)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(clean(obj), f, indent=2, ensure_ascii=False, allow_nan=False)
    os.replace(path + '.tmp', path)


def read_jsonl(path):
    """Rows of a jsonl we append to. A last line cut off by a kill is dropped (and cut from the file)."""
    if not os.path.isfile(path):
        return []
    with open(path, 'rb') as f:
        data = f.read()
    if data and not data.endswith(b'\n'):                 # a last line without its newline:
        last = data[data.rfind(b'\n') + 1:]
        try:                                               # whole (a file written by hand): end it, so appends
            json.loads(last)                               # start on a new line
            data += b'\n'
            with open(path, 'ab') as f:
                f.write(b'\n')
        except ValueError:                                 # cut by a kill: drop it, so appends stay valid
            data = data[:len(data) - len(last)]
            with open(path, 'r+b') as f:
                f.truncate(len(data))
    rows = []
    for i, line in enumerate(data.decode('utf-8').splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON line ({e}); fix or delete that line") from None
    return rows


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    ap = argparse.ArgumentParser(description="Score an image with the PromptEcho reward and show the least likely tokens")
    ap.add_argument('--vlm', required=True, help="transformers VLM directory")
    ap.add_argument('--image', required=True)
    ap.add_argument('--prompt', required=True, help="the prompt (label) to score")
    ap.add_argument('--query', default=QUERY)
    ap.add_argument('--top', type=int, default=10, help="how many least likely tokens to show")
    ap.add_argument('--trust_remote_code', action='store_true')
    a = ap.parse_args()
    if not os.path.isfile(a.image):
        raise SystemExit(f"image {a.image} not found")
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    m, p = load_vlm(a.vlm, dev, torch.bfloat16 if dev == 'cuda' else torch.float32, a.trust_remote_code)
    r, toks = promptecho_reward(m, p, [Image.open(a.image)], [a.prompt], a.query, return_tokens=True)
    print(f"reward {r[0].item():.4f}  (mean log-prob of {len(toks[0])} label tokens; 0 is perfect)")
    print("least likely label tokens (what the VLM does not see in the image):")
    for s, lp in sorted(toks[0], key=lambda t: t[1])[:a.top]:
        print(f"  {lp:8.3f}  {s!r}")
