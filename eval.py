"""
Evaluation: DenseAlignBench pairwise judging, benchmark image exports, and the toy world's metrics.

    python eval.py densealign --prompts heldout.jsonl --base DIR --lora out/run/ckpt/lora.safetensors \
        --judge local:VLM_DIR            # or --judge http://host:8000/v1 --judge_model NAME
    python eval.py export --bench geneval --prompts evaluation_metadata.jsonl --model DIR --lora F --out out/geneval
    python eval.py toy --lora out/toy/run/ckpt/lora.safetensors
"""
import argparse
import base64
import io
import json
import math
import os
import random
import re
import time
import urllib.request

import torch
from PIL import Image

import reward
import sample

JUDGE_PROMPT = (
    "You compare two images generated from the same text prompt. Judge ONLY how faithfully each image "
    "follows the prompt, not beauty or quality: the subjects present, their actions and poses, attributes "
    "(colour, size, material, texture), composition, style, any rendered text, spatial relations and counts. "
    "Prompt: \"{prompt}\"\nThe first image is image_a, the second is image_b. Answer with JSON only: "
    "{{\"reasoning\": \"<short comparison>\", \"preference\": \"image_a\" | \"image_b\" | \"tie\"}}")
JUDGE_TEMPERATURE = 0.3    # the paper's judge temperature
JUDGE_RETRIES = 3          # malformed answers are asked again this often, then counted as invalid
HTTP_TIMEOUT = 120         # seconds per request to an OpenAI-compatible endpoint
JUDGE_KEY_ENV = 'OPENAI_API_KEY'  # the endpoint's key, read from this environment variable (optional)


# -----------------------------------------------------------------------------
# the judge's answer and the bookkeeping

def parse_judgement(text):
    """'image_a' | 'image_b' | 'tie' from a judge's answer (JSON, fenced JSON, prose around it, or a bare word), else None."""
    for m in re.finditer(r'\{.*?\}', text, re.S):
        try:
            pref = json.loads(m.group(0)).get('preference')
        except (json.JSONDecodeError, AttributeError):
            continue
        if pref in ('image_a', 'image_b', 'tie'):
            return pref
    words = set(re.findall(r'\b(image_a|image_b|tie)\b', text))
    return words.pop() if len(words) == 1 else None


def outcome(pref, swapped):
    """+1 trained wins, -1 base wins, 0 tie, None invalid. Unswapped: image_a = base, image_b = trained."""
    if pref is None:
        return None
    if pref == 'tie':
        return 0
    trained_is_a = swapped
    return 1 if (pref == 'image_a') == trained_is_a else -1


def summarize(outcomes):
    """Win / loss / tie / invalid counts and net advantage (win - loss, pp) with a 95% normal interval
    over the per-item scores s in {+1, 0, -1} of the valid items: mean +- 1.96 sd / sqrt(n)."""
    valid = [o for o in outcomes if o is not None]
    n = len(valid)
    win, loss, tie = valid.count(1), valid.count(-1), valid.count(0)
    mean = sum(valid) / n if n else float('nan')
    sd = math.sqrt(sum((o - mean) ** 2 for o in valid) / (n - 1)) if n > 1 else float('nan')
    half = 1.96 * sd / math.sqrt(n) if n > 1 else float('nan')
    return {'n': len(outcomes), 'valid': n, 'win': win, 'loss': loss, 'tie': tie, 'invalid': len(outcomes) - n,
            'win_rate': win / n if n else float('nan'), 'loss_rate': loss / n if n else float('nan'),
            'tie_rate': tie / n if n else float('nan'), 'net_pp': 100 * mean, 'ci95_pp': (100 * (mean - half), 100 * (mean + half))}


def _png_b64(img):
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return base64.b64encode(buf.getvalue()).decode()


def http_judge(base_url, model_name):
    """A judge on any OpenAI-compatible chat endpoint (standard library HTTP, retries with backoff)."""
    def judge(prompt, img_a, img_b):
        body = {'model': model_name, 'temperature': JUDGE_TEMPERATURE, 'messages': [{'role': 'user', 'content': [
            {'type': 'text', 'text': JUDGE_PROMPT.format(prompt=prompt)},
            {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,' + _png_b64(img_a)}},
            {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,' + _png_b64(img_b)}}]}]}
        headers = {'Content-Type': 'application/json'}
        if os.environ.get(JUDGE_KEY_ENV):
            headers['Authorization'] = 'Bearer ' + os.environ[JUDGE_KEY_ENV]
        for attempt in range(5):
            try:
                req = urllib.request.Request(base_url.rstrip('/') + '/chat/completions', json.dumps(body).encode(), headers)
                with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
                    return json.loads(r.read())['choices'][0]['message']['content']
            except (OSError, KeyError, json.JSONDecodeError) as e:
                if attempt == 4:
                    raise RuntimeError(f"judge endpoint {base_url} failed 5 times: {e}") from None
                time.sleep(2 ** attempt)
    return judge


def local_judge(vlm_dir):
    """A judge from a local VLM directory (transformers generate, sampled at JUDGE_TEMPERATURE)."""
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    model, proc = reward.load_vlm(vlm_dir, dev, torch.bfloat16 if dev == 'cuda' else torch.float32)

    def judge(prompt, img_a, img_b):
        text = proc.apply_chat_template([{'role': 'user', 'content': [
            {'type': 'image'}, {'type': 'image'}, {'type': 'text', 'text': JUDGE_PROMPT.format(prompt=prompt)}]}],
            tokenize=False, add_generation_prompt=True)
        enc = {k: v.to(dev) for k, v in proc(text=[text], images=[img_a, img_b], return_tensors='pt').items()}
        out = model.generate(**enc, do_sample=True, temperature=JUDGE_TEMPERATURE, max_new_tokens=400)
        return proc.tokenizer.decode(out[0, enc['input_ids'].shape[1]:], skip_special_tokens=True)
    return judge


def run_densealign(rows, base_images, trained_images, judge_fn, out_dir, seed=0):
    """Judge every (base, trained) pair once; per-item rows appended to judgements.jsonl (resumable).
    base_images / trained_images: callables id -> PIL image (generated or read from the cache)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'judgements.jsonl')
    done = {}
    if os.path.isfile(path):
        done = {d['id']: d for d in map(json.loads, open(path))}
    rng = random.Random(seed)
    results = []
    for row in rows:
        swapped = rng.random() < 0.5                          # drawn for every item, in order: resume-stable
        if row['id'] in done:
            results.append(done[row['id']])
            continue
        a, b = base_images(row['id']), trained_images(row['id'])
        left, right = (b, a) if swapped else (a, b)
        pref, answers = None, []
        for _ in range(JUDGE_RETRIES):
            answers.append(judge_fn(row['prompt'], left, right))
            pref = parse_judgement(answers[-1])
            if pref is not None:
                break
        rec = {'id': row['id'], 'swapped': swapped, 'preference': pref, 'outcome': outcome(pref, swapped),
               'answers': answers}
        with open(path, 'a') as f:
            f.write(json.dumps(rec) + '\n')
        results.append(rec)
    return summarize([r['outcome'] for r in results])


# -----------------------------------------------------------------------------
# toy: the toy world's exact metrics (detector) and how well the reward agrees with it

@torch.no_grad()
def toy_metrics(model_dir, vlm_dir, prompts_file, lora='', n=64, k=4, steps=12, cfg=3.5, size=64, seed=0):
    """Held-out accuracy of a toy policy (+ LoRA) by the exact detector, its mean PromptEcho reward, and
    the within-group agreement: over pairs of images of the same prompt whose detector scores differ,
    the fraction the reward orders the same way (what group advantages need; 0.5 = chance)."""
    import toy
    m = sample.load_model(model_dir)
    if lora:
        sample.load_lora(m, lora)
    vm, vp = reward.load_vlm(vlm_dir)
    rows = sample.read_prompts(prompts_file)[:n]
    prompts = [r['prompt'] for r in rows for _ in range(k)]          # k images per prompt, fixed seeds
    imgs, _ = sample.generate(m, prompts, [seed + i for i in range(len(prompts))], steps, cfg, size, size, '', 32)
    r = reward.promptecho_reward(vm, vp, imgs, prompts, max_batch=32).view(-1, k)         # [n, k]
    sc = [toy.score(a, p) for a, p in zip(sample.to_uint8(imgs), prompts)]
    frac = torch.tensor([s[0] for s in sc]).view(-1, k)                                   # [n, k] claims satisfied
    correct = torch.tensor([float(s[1]) for s in sc])
    dr = r[:, :, None] - r[:, None, :]                                                    # [n, k, k] pairs
    df = frac[:, :, None] - frac[:, None, :]
    pairs = df > 0                                                                        # i more correct than j
    agree = (dr[pairs] > 0).float()
    return {'accuracy': correct.mean().item(), 'claims': frac.mean().item(), 'reward': r.mean().item(),
            'agreement': agree.mean().item() if len(agree) else float('nan'), 'pairs': int(pairs.sum())}


# -----------------------------------------------------------------------------
# image caches and benchmark layouts

def cached_images(m, rows, out, steps, cfg, size, seed, batch=4):
    """Generate rows' images (seed + row index) into out/<id>.png, skipping those already there."""
    from tqdm import tqdm
    os.makedirs(out, exist_ok=True)
    todo = [(i, r) for i, r in enumerate(rows) if not os.path.isfile(os.path.join(out, f"{r['id']}.png"))]
    for s in tqdm(range(0, len(todo), batch), desc=f'images -> {out}'):
        chunk = todo[s:s + batch]
        imgs, _ = sample.generate(m, [r['prompt'] for _, r in chunk], [seed + i for i, _ in chunk], steps, cfg,
                                  size, size, '', batch)
        for (_, r), a in zip(chunk, sample.to_uint8(imgs)):
            sample.save_png(Image.fromarray(a), os.path.join(out, f"{r['id']}.png"))
    return lambda i: Image.open(os.path.join(out, f'{i}.png')).convert('RGB')


def export_geneval(m, prompt_file, out, n=4, steps=50, cfg=4.0, size=1024, seed=0):
    """GenEval: OUT/<NNNNN>/metadata.jsonl (the prompt file's line, verbatim) + samples/<NNNN>.png + grid.png."""
    lines = [l for l in open(prompt_file, encoding='utf-8').read().splitlines() if l.strip()]
    for i, line in enumerate(lines):
        d = os.path.join(out, f'{i:05d}')
        if os.path.isfile(os.path.join(d, 'grid.png')):
            continue                                          # resumable
        os.makedirs(os.path.join(d, 'samples'), exist_ok=True)
        with open(os.path.join(d, 'metadata.jsonl'), 'w', encoding='utf-8') as f:
            f.write(line + '\n')
        imgs, _ = sample.generate(m, [json.loads(line)['prompt']] * n, [seed + k for k in range(n)], steps, cfg, size, size)
        for k, a in enumerate(sample.to_uint8(imgs)):
            sample.save_png(Image.fromarray(a), os.path.join(d, 'samples', f'{k:04d}.png'))
        sample.save_png(sample.grid(imgs, min(n, 4)), os.path.join(d, 'grid.png'))


def export_dpg(m, rows, out, steps=50, cfg=4.0, size=1024, seed=0):
    """DPG-Bench: OUT/<id>.png holding a 2x2 grid of 4 samples per prompt."""
    os.makedirs(out, exist_ok=True)
    for r in rows:
        f = os.path.join(out, f"{r['id']}.png")
        if not os.path.isfile(f):
            imgs, _ = sample.generate(m, [r['prompt']] * 4, [seed + k for k in range(4)], steps, cfg, size, size)
            sample.save_png(sample.grid(imgs, 2), f)


def export_tiif(m, prompt_file, out, model_name, steps=50, cfg=4.0, size=1024, seed=0):
    """TIIF-Bench: OUT/<type>/<model_name>/{short,long}_description/<i>.png, i = index within that type."""
    per_type = {}
    for line in open(prompt_file, encoding='utf-8'):
        if line.strip():
            row = json.loads(line)
            per_type.setdefault(row['type'], []).append(row)
    for typ, rows in per_type.items():
        for i, row in enumerate(rows):
            for key in ('short_description', 'long_description'):
                f = os.path.join(out, typ, model_name, key, f'{i}.png')
                if not os.path.isfile(f):
                    os.makedirs(os.path.dirname(f), exist_ok=True)
                    imgs, _ = sample.generate(m, [row[key]], [seed + i], steps, cfg, size, size)
                    sample.save_png(Image.fromarray(sample.to_uint8(imgs)[0]), f)


def _dpg_rows(path):
    if os.path.isdir(path):                                   # a folder of <id>.txt files
        return [{'id': f[:-4], 'prompt': open(os.path.join(path, f)).read().strip()}
                for f in sorted(os.listdir(path)) if f.endswith('.txt')]
    return sample.read_prompts(path)


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    d = sub.add_parser('densealign', help="pairwise VLM judging of base vs trained on held-out captions")
    d.add_argument('--prompts', required=True)
    d.add_argument('--base', required=True, help="diffusers model directory")
    d.add_argument('--lora', required=True, help="the trained LoRA")
    d.add_argument('--judge', required=True, help="local:VLM_DIR or http(s)://host/v1")
    d.add_argument('--judge_model', default='')
    d.add_argument('--vlm', default='', help="also report the mean PromptEcho reward of both models with this VLM")
    d.add_argument('--n', type=int, default=2000)
    e = sub.add_parser('export', help="images in the folder layout of an official benchmark evaluator")
    e.add_argument('--bench', required=True, choices=['geneval', 'dpg', 'tiif'])
    e.add_argument('--prompts', required=True)
    e.add_argument('--model', required=True)
    e.add_argument('--lora', default='')
    e.add_argument('--n', type=int, default=4)
    e.add_argument('--model_name', default='promptecho')
    t = sub.add_parser('toy', help="the toy world's exact metrics for the base and a trained policy")
    t.add_argument('--toy_dir', default='out/toy')
    t.add_argument('--lora', default='')
    t.add_argument('--vlm', default='', help="default: TOY_DIR/vlm")
    t.add_argument('--n', type=int, default=64)
    t.add_argument('--k', type=int, default=4)
    for p in (d, e, t):
        p.add_argument('--out', default='out/eval')
        p.add_argument('--steps', type=int, default=12 if p is t else 50)
        p.add_argument('--cfg', type=float, default=3.5 if p is t else 4.0)
        p.add_argument('--size', type=int, default=64 if p is t else 1024)
        p.add_argument('--seed', type=int, default=0)
    a = ap.parse_args()
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    dtype = torch.bfloat16 if dev == 'cuda' else torch.float32
    os.makedirs(a.out, exist_ok=True)
    if a.cmd == 'toy':
        res = {'base': toy_metrics(os.path.join(a.toy_dir, 'zimage'), a.vlm or os.path.join(a.toy_dir, 'vlm'),
                                   os.path.join(a.toy_dir, 'heldout.jsonl'), '', a.n, a.k, a.steps, a.cfg, a.size, a.seed)}
        if a.lora:
            res['trained'] = toy_metrics(os.path.join(a.toy_dir, 'zimage'), a.vlm or os.path.join(a.toy_dir, 'vlm'),
                                         os.path.join(a.toy_dir, 'heldout.jsonl'), a.lora, a.n, a.k, a.steps, a.cfg,
                                         a.size, a.seed)
    elif a.cmd == 'export':
        m = sample.load_model(a.model, dev, dtype)
        if a.lora:
            sample.load_lora(m, a.lora)
        kw = dict(steps=a.steps, cfg=a.cfg, size=a.size, seed=a.seed)
        if a.bench == 'geneval':
            export_geneval(m, a.prompts, a.out, a.n, **kw)
        elif a.bench == 'dpg':
            export_dpg(m, _dpg_rows(a.prompts), a.out, **kw)
        else:
            export_tiif(m, a.prompts, a.out, a.model_name, **kw)
        res = {'bench': a.bench, 'out': a.out}
    else:
        rows = sample.read_prompts(a.prompts)[:a.n]
        judge = (local_judge(a.judge[len('local:'):]) if a.judge.startswith('local:') else
                 http_judge(a.judge, a.judge_model) if a.judge.startswith('http') else None)
        if judge is None:
            raise SystemExit("--judge must be local:VLM_DIR or an http(s):// OpenAI-compatible base URL")
        m = sample.load_model(a.base, dev, dtype)
        base_img = cached_images(m, rows, os.path.join(a.out, 'images', 'base'), a.steps, a.cfg, a.size, a.seed)
        sample.load_lora(m, a.lora)
        trained_img = cached_images(m, rows, os.path.join(a.out, 'images', 'trained'), a.steps, a.cfg, a.size, a.seed)
        res = run_densealign(rows, base_img, trained_img, judge, a.out, a.seed)
        if a.vlm:
            vm, vp = reward.load_vlm(a.vlm, dev, dtype)
            for name, get in (('base', base_img), ('trained', trained_img)):
                res[f'reward_{name}'] = reward.promptecho_reward(vm, vp, [get(r['id']) for r in rows],
                                                                 [r.get('label', r['prompt']) for r in rows]).mean().item()
    with open(os.path.join(a.out, 'summary.json.tmp'), 'w') as f:
        json.dump(res, f, indent=2)
    os.replace(os.path.join(a.out, 'summary.json.tmp'), os.path.join(a.out, 'summary.json'))
    print(json.dumps(res, indent=2))
