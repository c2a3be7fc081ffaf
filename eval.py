"""
Evaluation: DenseAlignBench pairwise judging, image exports for the official benchmark evaluators,
and the toy world's metrics.

DenseAlignBench (PromptEcho paper, Sec. 4.2): one image per held-out caption from the baseline and
from the trained model (same seed), then a VLM judge picks the image that follows the caption better
(prompt following only, not aesthetics). The pair order is swapped at random (p = 0.5) to cancel
position bias and swapped back when counting; judge temperature 0.3. Paper, Z-Image: trained wins
61.5%, baseline wins 34.7%, ties 3.8% -> net +26.8pp.

    python eval.py densealign --prompts dab.jsonl --base DIR --lora out/run/ckpt/lora.safetensors \
        --judge local:VLM_DIR                     # or --judge http://host:8000/v1 --judge_model NAME
    python eval.py export --bench geneval --prompts evaluation_metadata.jsonl --model DIR --lora F --out out/geneval
    python eval.py export --bench dpg --prompts dpg_prompts/ --model DIR --lora F --out out/dpg
    python eval.py export --bench tiif --prompts tiif.jsonl --model DIR --lora F --out out/tiif --model_name ours
    python eval.py toy --lora out/toy/run/ckpt/lora.safetensors

Everything is resumable: images already on disk are not generated again and pairs already judged
(OUT/judgements.jsonl) are not judged again.
"""
import argparse
import base64
import collections
import functools
import http.client
import io
import json
import math
import os
import random
import re
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from PIL import Image

import reward
import sample

# The judge's instructions (our wording of the criteria in the paper's Appendix A).
JUDGE_PROMPT = """You grade text-to-image models on one thing only: how faithfully an image follows its prompt.
Two images were generated from the same prompt. The first image is image_a, the second is image_b.

Prompt:
{prompt}

How to grade:
1. List what the prompt asks for: the subjects and objects; their actions and poses; their attributes \
(colour, size, material, texture); the composition and layout; the style and mood; any text that should \
appear in the image (its exact wording); spatial relations (left/right, in front/behind, foreground/background); \
and how many there are of each thing.
2. Check every item in each image: shown correctly, shown wrongly, or missing. Note anything that contradicts the prompt.
3. Prefer the image that gets more of the prompt right; clear errors (a wrong count, a wrong colour, a missing \
subject, misspelt text) weigh more than small omissions.
Do not reward beauty, realism, sharpness or artistic merit: a plain image that matches the prompt beats a \
beautiful one that does not. The order of the images says nothing about which is better. Answer "tie" only \
when both follow the prompt equally well.

Reply with one JSON object and nothing else:
{{"reasoning": "<what each image gets right and wrong>", "preference": "image_a" | "image_b" | "tie"}}"""
PREFERENCES = ('image_a', 'image_b', 'tie')  # the judge's allowed answers
JUDGE_TEMPERATURE = 0.3    # the paper's judge temperature
JUDGE_RETRIES = 2          # a malformed answer is asked again this many times, then counted as 'invalid'
JUDGE_MAX_NEW_TOKENS = 800 # local judge: room for the reasoning and the JSON
JUDGE_KEY_ENV = 'OPENAI_API_KEY'  # API key of the HTTP judge, read from this environment variable (optional)
HTTP_TIMEOUT = 180         # seconds per request to an OpenAI-compatible endpoint
HTTP_ATTEMPTS = 5          # tries per request on timeouts, 429 and 5xx; waits HTTP_BACKOFF * 2^k s in between
HTTP_BACKOFF = 2.0         # first wait in seconds
Z95 = 1.96                 # normal quantile of the 95% intervals
GEN_BATCH = 4              # images per sample.generate call
REWARD_CHUNK = 32          # image pairs loaded per PromptEcho reward call (--vlm)


# -----------------------------------------------------------------------------
# small helpers (the jsonl / json files: reward.py)

def file_name(row_id):
    """A row id as a file name: path separators and odd characters become '_'."""
    return re.sub(r'[^\w.\-]', '_', str(row_id))


def unique_names(rows):
    names = [file_name(r['id']) for r in rows]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two prompts share the id {dup!r} (as a file name); ids must be unique")
    return names


def device_dtype():
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    return dev, torch.bfloat16 if dev == 'cuda' else torch.float32


# -----------------------------------------------------------------------------
# the judge's answer and the bookkeeping

def _pref(value):
    v = re.sub(r'[\s\-]+', '_', str(value).strip().lower())
    return v if v in PREFERENCES else None


def parse_judgement(text):
    """'image_a' | 'image_b' | 'tie' from a judge's answer, else None. Tries, in order: the first JSON object
    with a "preference" key (inside code fences or prose too), a "preference": "..." pair in broken JSON or
    single quotes, and a bare answer word when exactly one of the three appears."""
    if not isinstance(text, str):
        return None
    dec = json.JSONDecoder()
    for m in re.finditer(r'\{', text):
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and 'preference' in obj:
            return _pref(obj['preference'])
    m = re.search(r'["\']preference["\']\s*:\s*["\']([^"\']*)["\']', text)
    if m:
        return _pref(m.group(1))
    words = {_pref(w) for w in re.findall(r'\b(image[ _]?[ab]|tie)\b', text, re.I)}
    return words.pop() if len(words) == 1 else None


def outcome(pref, swapped):
    """+1 trained wins, -1 baseline wins, 0 tie, None invalid. Unswapped: image_a = baseline, image_b = trained."""
    if pref is None:
        return None
    if pref == 'tie':
        return 0
    return 1 if (pref == 'image_a') == swapped else -1


def mean_ci(xs):
    """(mean, lo, hi): 95% normal interval mean +- 1.96 sd / sqrt(n), sd with n - 1. None where undefined."""
    n = len(xs)
    if n == 0:
        return None, None, None
    mean = sum(xs) / n
    if n == 1:
        return mean, None, None
    half = Z95 * math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def summarize(outcomes):
    """Counts and rates (win/loss/tie over valid items, invalid over all) and the net advantage
    win - loss in pp with its 95% interval: the mean of per-item scores s in {+1, 0, -1} over the
    valid items, mean +- 1.96 sd / sqrt(n) (normal approximation), times 100."""
    valid = [o for o in outcomes if o is not None]
    n, k = len(outcomes), len(valid)
    win, loss, tie = valid.count(1), valid.count(-1), valid.count(0)
    mean, lo, hi = mean_ci(valid)
    pp = lambda x: None if x is None else 100 * x
    rate = lambda c, d: c / d if d else None
    return {'n': n, 'valid': k, 'win': win, 'loss': loss, 'tie': tie, 'invalid': n - k,
            'win_rate': rate(win, k), 'loss_rate': rate(loss, k), 'tie_rate': rate(tie, k),
            'invalid_rate': rate(n - k, n), 'net_pp': pp(mean), 'ci95_pp': [pp(lo), pp(hi)],
            'ci_method': 'normal approximation on per-item scores in {+1, 0, -1} over valid items: '
                         'mean +- 1.96 sd / sqrt(n)'}


def judge_pairs(rows, base_image, trained_image, judge_fn, out_dir, seed=0):
    """Judge each (baseline, trained) pair once, appending per-item records to OUT/judgements.jsonl.
    base_image / trained_image: id -> PIL image. judge_fn(prompt, image_a, image_b) -> answer text.
    The swap of item i is the i-th draw of random.Random(seed), drawn for every item in order, so a
    resumed run makes the same swaps. Returns the records of all rows, in row order."""
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'judgements.jsonl')
    done = {str(r['id']): r for r in reward.read_jsonl(path)}
    rng = random.Random(seed)
    records = []
    for row in tqdm(rows, desc='judging', disable=len(done) >= len(rows)):
        swapped = rng.random() < 0.5
        if str(row['id']) in done:
            records.append(done[str(row['id'])])
            continue
        a, b = base_image(row['id']), trained_image(row['id'])
        left, right = (b, a) if swapped else (a, b)
        answers, pref = [], None
        for _ in range(1 + JUDGE_RETRIES):
            answers.append(judge_fn(row['prompt'], left, right))
            pref = parse_judgement(answers[-1])
            if pref is not None:
                break
        o = outcome(pref, swapped)
        rec = {'id': row['id'], 'swapped': swapped, 'preference': pref, 'outcome': o,
               'winner': {1: 'trained', -1: 'baseline', 0: 'tie', None: 'invalid'}[o], 'answers': answers}
        reward.append_jsonl(path, [rec])
        records.append(rec)
    return records


# -----------------------------------------------------------------------------
# judges: judge(prompt, image_a, image_b) -> the answer text

def local_judge(vlm_dir, device='cpu', dtype=torch.float32, seed=0, max_new_tokens=JUDGE_MAX_NEW_TOKENS):
    """A judge from a local transformers VLM: both images in one user turn, sampled at JUDGE_TEMPERATURE."""
    model, proc = reward.load_vlm(vlm_dir, device, dtype)
    torch.manual_seed(seed)

    def judge(prompt, img_a, img_b):
        return reward.generate_text(model, proc, [[img_a, img_b]], [JUDGE_PROMPT.format(prompt=prompt)],
                                    JUDGE_TEMPERATURE, max_new_tokens)[0]
    return judge


def _png_b64(img):
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return base64.b64encode(buf.getvalue()).decode()


def post_json(url, body, headers, timeout=HTTP_TIMEOUT, attempts=HTTP_ATTEMPTS):
    """POST JSON, return the decoded reply. Timeouts, connection errors, 408/429/5xx and unreadable replies
    are retried with exponential backoff; other HTTP errors (400, 401, 404, ...) fail at once."""
    data = json.dumps(body).encode()
    for k in range(attempts):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code not in (408, 429) and e.code < 500:
                detail = e.read()[:300].decode('utf-8', 'replace')
                raise ConnectionError(f"judge endpoint {url} answered HTTP {e.code}: {detail}") from None
            err = f"HTTP {e.code}"
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:   # URLError, timeouts, resets,
                                                                                 # a cut-off or garbled body
            err = f"{type(e).__name__}: {e}"
        if k + 1 < attempts:
            time.sleep(HTTP_BACKOFF * 2 ** k)
    raise ConnectionError(f"judge endpoint {url} failed {attempts} times, last: {err}")


def http_judge(base_url, model_name):
    """A judge on any OpenAI-compatible chat endpoint: POST {base_url}/chat/completions with the two images
    as PNG data URLs (standard-library HTTP)."""
    url = base_url.rstrip('/') + '/chat/completions'
    headers = {'Content-Type': 'application/json'}
    if os.environ.get(JUDGE_KEY_ENV):
        headers['Authorization'] = 'Bearer ' + os.environ[JUDGE_KEY_ENV]

    def judge(prompt, img_a, img_b):
        body = {'model': model_name, 'temperature': JUDGE_TEMPERATURE, 'messages': [{'role': 'user', 'content': [
            {'type': 'text', 'text': JUDGE_PROMPT.format(prompt=prompt)},
            {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,' + _png_b64(img_a)}},
            {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,' + _png_b64(img_b)}}]}]}
        reply = post_json(url, body, headers)
        try:
            content = reply['choices'][0]['message']['content']
        except (KeyError, IndexError, TypeError):
            return ''                                          # counted as malformed: asked again
        if isinstance(content, list):                          # some servers answer in parts
            content = ''.join(p.get('text', '') for p in content if isinstance(p, dict))
        return content or ''
    return judge


def make_judge(spec, judge_model='', device='cpu', dtype=torch.float32, seed=0):
    """--judge local:VLM_DIR or http(s)://host/v1 -> judge function."""
    if spec.startswith('local:'):
        return local_judge(spec[len('local:'):], device, dtype, seed)
    if spec.startswith(('http://', 'https://')):
        if not judge_model:
            raise ValueError("an HTTP judge needs --judge_model NAME (the model the endpoint serves)")
        return http_judge(spec, judge_model)
    raise ValueError(f"--judge {spec!r}: use local:VLM_DIR or an http(s):// OpenAI-compatible base URL")


# -----------------------------------------------------------------------------
# images: generated once, cached as PNGs

def render(model, jobs, steps, cfg, size, batch=GEN_BATCH, desc='images'):
    """jobs: (path, prompt, seed) triples; writes the missing PNGs (atomically), skips the rest.
    model: a loaded model, or a function that loads it (called only if something is missing)."""
    from tqdm import tqdm
    clean_tmp({os.path.dirname(j[0]) for j in jobs})
    todo = [j for j in jobs if not os.path.isfile(j[0])]
    if not todo:
        return 0
    m = model() if callable(model) else model
    for i in tqdm(range(0, len(todo), batch), desc=desc):
        chunk = todo[i:i + batch]
        imgs, _ = sample.generate(m, [p for _, p, _ in chunk], [s for _, _, s in chunk], steps, cfg, size, size, '', batch)
        for (path, _, _), a in zip(chunk, sample.to_uint8(imgs)):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            sample.save_png(Image.fromarray(a), path)
    return len(todo)


def clean_tmp(dirs):
    """Remove the hidden temp files (sample.save_png's) a killed run left in these folders."""
    for d in dirs:
        for f in os.listdir(d) if os.path.isdir(d) else []:
            if f.startswith('.') and f.endswith('.tmp'):
                os.remove(os.path.join(d, f))


def check_rows(rows, out_dir):
    """OUT/prompts.jsonl remembers what each id asked: a resume that gives an id another prompt (label, query)
    is refused, since its images, judgement and rewards belong to the old one; new ids are added."""
    path = os.path.join(out_dir, 'prompts.jsonl')
    known = {str(r['id']): r for r in reward.read_jsonl(path)}
    what = lambda r: {'id': r['id'], 'prompt': r['prompt'], 'label': r.get('label', r['prompt']),
                      'query': r.get('query', reward.QUERY)}
    for r in rows:
        old = known.get(str(r['id']))
        if old is not None and old != what(r):
            raise ValueError(f"{out_dir} holds id {r['id']!r} with prompt {old['prompt']!r} (label, query), not "
                             f"{r['prompt']!r}; use another --out for another prompt set")
    reward.append_jsonl(path, [what(r) for r in rows if str(r['id']) not in known])


def load_t2i(path, lora, device, dtype):
    m = sample.load_model(path, device, dtype)
    if lora:
        sample.load_lora(m, lora)
    return m


def densealign_images(rows, out_dir, base, lora, base_lora, steps, cfg, size, seed, device, dtype, batch=GEN_BATCH):
    """OUT/images/{base,trained}/<id>.png, row i with seed + i for both models. Models load only if needed."""
    names = unique_names(rows)
    jobs = {side: [(os.path.join(out_dir, 'images', side, f'{n}.png'), r['prompt'], seed + i)
                   for i, (n, r) in enumerate(zip(names, rows))] for side in ('base', 'trained')}
    made = {'base': 0, 'trained': 0}
    m = None
    if any(not os.path.isfile(j[0]) for j in jobs['base']):
        m = load_t2i(base, base_lora, device, dtype)
        made['base'] = render(m, jobs['base'], steps, cfg, size, batch, 'baseline images')
    if any(not os.path.isfile(j[0]) for j in jobs['trained']):
        if m is None or base_lora:                             # a fresh copy when the baseline carries a LoRA
            del m
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            m = load_t2i(base, lora, device, dtype)
        elif lora:
            sample.load_lora(m, lora)
        made['trained'] = render(m, jobs['trained'], steps, cfg, size, batch, 'trained images')
    del m
    if torch.cuda.is_available():
        torch.cuda.empty_cache()                               # room for the judge
    return made


def densealign_rewards(rows, out_dir, vlm, device, dtype):
    """Per-item PromptEcho rewards of both images (OUT/rewards.jsonl, resumable) -> means and paired difference."""
    from tqdm import tqdm
    path = os.path.join(out_dir, 'rewards.jsonl')
    vlm_path = os.path.abspath(vlm)                            # a record counts only for the VLM that made it
    done = {str(r['id']): r for r in reward.read_jsonl(path) if r.get('vlm') == vlm_path}
    todo = [(n, r) for n, r in zip(unique_names(rows), rows) if str(r['id']) not in done]
    if todo:
        vm, vp = reward.load_vlm(vlm, device, dtype)
        for i in tqdm(range(0, len(todo), REWARD_CHUNK), desc='PromptEcho reward'):
            chunk = todo[i:i + REWARD_CHUNK]
            labels = [r.get('label', r['prompt']) for _, r in chunk]
            queries = [r.get('query', reward.QUERY) for _, r in chunk]
            out = {}
            for side in ('base', 'trained'):
                ims = [Image.open(os.path.join(out_dir, 'images', side, f'{n}.png')).convert('RGB') for n, _ in chunk]
                out[side] = reward.promptecho_reward(vm, vp, ims, labels, queries).tolist()
            recs = [{'id': r['id'], 'base': b, 'trained': t, 'vlm': vlm_path}
                    for (_, r), b, t in zip(chunk, out['base'], out['trained'])]
            reward.append_jsonl(path, recs)
            done.update({str(x['id']): x for x in recs})
    recs = [done[str(r['id'])] for r in rows]
    diff, lo, hi = mean_ci([x['trained'] - x['base'] for x in recs])
    return {'reward_base': sum(x['base'] for x in recs) / len(recs),
            'reward_trained': sum(x['trained'] for x in recs) / len(recs),
            'reward_diff': diff, 'reward_diff_ci95': [lo, hi]}


def run_densealign(rows, out_dir, base, lora='', base_lora='', judge='', judge_model='', judge_fn=None, vlm='',
                   steps=50, cfg=4.0, size=1024, seed=0, device=None, dtype=None, batch=GEN_BATCH):
    """The whole protocol: images, judging, (rewards), OUT/summary.json. judge_fn(prompt, image_a, image_b) -> text
    overrides --judge (tests, custom judges). Refuses to resume an OUT made with other settings."""
    if not (lora or base_lora):
        raise ValueError("nothing to compare: give --lora (the trained model) and/or --base_lora (the baseline)")
    for f in (lora, base_lora):
        if f and not os.path.isfile(f):
            raise FileNotFoundError(f"LoRA file {f} not found")
    if not os.path.isdir(base) and not sample.is_hub_id(base):
        raise FileNotFoundError(f"model directory {base} not found")
    if device is None:
        device, dtype = device_dtype()
    os.makedirs(out_dir, exist_ok=True)
    settings = {'base': os.path.abspath(base), 'lora': lora and os.path.abspath(lora),
                'base_lora': base_lora and os.path.abspath(base_lora), 'steps': steps, 'cfg': cfg, 'size': size,
                'seed': seed, 'judge': 'custom' if judge_fn else f'{judge} {judge_model}'.strip()}
    sp = os.path.join(out_dir, 'settings.json')
    if os.path.isfile(sp):
        old = json.load(open(sp))
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{out_dir} holds a run with other settings {diff} (old, new); use another --out")
    else:
        reward.write_json(settings, sp)
    names = dict(zip((str(r['id']) for r in rows), unique_names(rows)))   # (checks the ids before check_rows
    check_rows(rows, out_dir)                                                # records them)
    made = densealign_images(rows, out_dir, base, lora, base_lora, steps, cfg, size, seed, device, dtype, batch)
    done = {str(r['id']) for r in reward.read_jsonl(os.path.join(out_dir, 'judgements.jsonl'))}
    if judge_fn is None and any(str(r['id']) not in done for r in rows):
        judge_fn = make_judge(judge, judge_model, device, dtype, seed)
    img = lambda side: lambda i: Image.open(os.path.join(out_dir, 'images', side, f'{names[str(i)]}.png')).convert('RGB')
    records = judge_pairs(rows, img('base'), img('trained'), judge_fn, out_dir, seed)
    res = summarize([r['outcome'] for r in records]) | {'images_generated': made, 'settings': settings}
    if vlm:
        judge_fn = None                                        # a local judge leaves memory before the reward VLM
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        res |= densealign_rewards(rows, out_dir, vlm, device, dtype)
    reward.write_json(res, os.path.join(out_dir, 'summary.json'))
    return res


def format_table(res):
    """The summary as a small text table."""
    f = lambda x: '   n/a' if x is None else f'{100 * x:5.1f}%'
    lines = [f"DenseAlignBench: {res['n']} pairs, {res['valid']} judged validly",
             f"  {'':16s}{'count':>7s}{'rate':>8s}",
             f"  {'trained wins':16s}{res['win']:7d}{f(res['win_rate']):>8s}",
             f"  {'baseline wins':16s}{res['loss']:7d}{f(res['loss_rate']):>8s}",
             f"  {'ties':16s}{res['tie']:7d}{f(res['tie_rate']):>8s}",
             f"  {'invalid':16s}{res['invalid']:7d}{f(res['invalid_rate']):>8s}  (of all pairs)"]
    lo, hi = res['ci95_pp']
    if res['net_pp'] is not None:
        ci = f"  (95% CI {lo:+.1f} .. {hi:+.1f})" if lo is not None else ''
        lines.append(f"  net advantage (win - loss): {res['net_pp']:+.1f} pp{ci}")
    if 'reward_base' in res:
        lines.append(f"  mean PromptEcho reward: baseline {res['reward_base']:.4f}, trained {res['reward_trained']:.4f}")
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# toy: the toy world's exact metrics (detector) and how well the reward agrees with it

@torch.no_grad()
def toy_metrics(model_dir, vlm_dir, prompts_file, lora='', n=64, k=4, steps=12, cfg=3.5, size=64, seed=0,
                query=reward.QUERY, stride=1, keep=None):
    """Held-out accuracy of a toy policy (+ LoRA) by the exact detector, its mean PromptEcho reward, and
    the within-group agreement: over pairs of images of the same prompt whose detector scores differ,
    the fraction the reward orders the same way (what group advantages need; 0.5 = chance); and the same
    over pairs of an all-correct image and a wrong one only (agreement_correct); the best of 1, 2, 4, ..., k
    images (best_of); what the wrong images get wrong (errors: toy.error_kind counts) and what the over-full
    ones hold (over_full: toy.surplus). n prompts: every stride-th line of prompts_file (of those whose prompt
    passes keep, when given)."""
    import toy
    rows = [r for r in sample.read_prompts(prompts_file) if keep is None or keep(r['prompt'])][::stride][:n]
    if not rows:
        raise ValueError(f"no prompt of {prompts_file} is left to evaluate (check --meanings / --stride / --n)")
    m = sample.load_model(model_dir)
    if lora:
        sample.load_lora(m, lora)
    vm, vp = reward.load_vlm(vlm_dir)
    from tqdm import tqdm
    prompts = [r['prompt'] for r in rows for _ in range(k)]          # k images per prompt, fixed seeds
    seeds = [seed + i for i in range(len(prompts))]
    imgs = torch.cat([sample.generate(m, prompts[i:i + 32], seeds[i:i + 32], steps, cfg, size, size, '', 32)[0]
                      for i in tqdm(range(0, len(prompts), 32), desc='trained images' if lora else 'base images')])
    labels = [r.get('label', r['prompt']) for r in rows for _ in range(k)]   # the reward reads a row as train.py does:
    queries = [r.get('query', query) for r in rows for _ in range(k)]       # its label and query, when it has them
    r = reward.promptecho_reward(vm, vp, imgs, labels, queries, max_batch=32).view(-1, k)  # [n, k]
    u8 = sample.to_uint8(imgs)
    sc = [toy.score(a, p) for a, p in zip(u8, prompts)]
    frac = torch.tensor([s[0] for s in sc]).view(-1, k)                                   # [n, k] claims satisfied
    correct = torch.tensor([float(s[1]) for s in sc])
    agree, pairs = group_agreement(r, frac)
    ok = correct.view(-1, k)                                                              # [n, k] all-correct
    agree_ok, pairs_ok = group_agreement(r, ok)                    # all-correct image vs a wrong one only
    over = [x for x in (toy.surplus(a, p) for a, p in zip(u8, prompts)) if x is not None]
    return {'accuracy': correct.mean().item(), 'claims': frac.mean().item(), 'reward': r.mean().item(),
            'best_of': best_of(r, ok),
            'agreement': agree, 'pairs': pairs, 'agreement_correct': agree_ok, 'pairs_correct': pairs_ok,
            'errors': dict(collections.Counter(toy.error_kind(a, p) for a, p in zip(u8, prompts))),
            'over_full': {'images': len(over), 'both_rows': sum(x[0] for x in over),           # toy.surplus
                          'copies': sum(x[1] for x in over), 'recoloured': sum(x[2] for x in over)}}


def best_of(r, ok):
    """Best of the first j images of each prompt, j = 1, 2, 4, ... and k: 'pass', the fraction of prompts with
    an all-correct one (what sharpening the policy toward its own best samples could reach at most), and
    'reward_pick', the accuracy of the one the reward ranks first (best-of-j reranking; the first on ties).
    r, ok: [n, k] reward and all-correct (0/1). -> {j: {'pass', 'reward_pick'}}."""
    k, out = r.shape[1], {}
    for j in sorted({2 ** i for i in range(k.bit_length())} | {k}):
        pick = ok[:, :j].gather(1, r[:, :j].argmax(1, keepdim=True))                     # [n, 1]
        out[j] = {'pass': ok[:, :j].amax(1).mean().item(), 'reward_pick': pick.mean().item()}
    return out


def group_agreement(r, score):
    """Over pairs (i, j) of one prompt's images with score_i > score_j, the fraction with r_i > r_j
    (ties in r count as disagreement). r, score: [n, k]. -> (rate or nan, number of pairs)."""
    dr = r[:, :, None] - r[:, None, :]                                                    # [n, k, k]
    pairs = (score[:, :, None] - score[:, None, :]) > 0                                   # i more correct than j
    agree = (dr[pairs] > 0).float()
    return (agree.mean().item() if len(agree) else float('nan')), int(pairs.sum())


# -----------------------------------------------------------------------------
# benchmark layouts (the folders the official evaluators read)

def export_geneval(model, prompt_file, out, n=4, steps=50, cfg=4.0, size=1024, seed=0, grid=True, batch=GEN_BATCH):
    """GenEval: OUT/<NNNNN>/metadata.jsonl (line N of the prompt file, verbatim), OUT/<NNNNN>/samples/<NNNN>.png
    (n per prompt, sample k with seed + k) and OUT/<NNNNN>/grid.png. N is the 0-based line index."""
    if not os.path.isfile(prompt_file):
        raise FileNotFoundError(f"prompt file {prompt_file} not found")
    lines = open(prompt_file, encoding='utf-8').read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    jobs = []
    for i, line in enumerate(lines):
        try:
            prompt = json.loads(line)['prompt']
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{prompt_file}:{i + 1}: not a GenEval line (a JSON object with a 'prompt')") from None
        d = os.path.join(out, f'{i:05d}')
        os.makedirs(os.path.join(d, 'samples'), exist_ok=True)
        meta = os.path.join(d, 'metadata.jsonl')
        if not os.path.isfile(meta):
            with open(meta + '.tmp', 'w', encoding='utf-8') as f:
                f.write(line + '\n')
            os.replace(meta + '.tmp', meta)
        jobs += [(os.path.join(d, 'samples', f'{k:04d}.png'), prompt, seed + k) for k in range(n)]
    stale = set()                                              # an earlier export with a larger n: GenEval would
    for i in range(len(lines)):                                # score every <k>.png of the folder
        d = os.path.join(out, f'{i:05d}')
        for f in os.listdir(os.path.join(d, 'samples')):
            if re.fullmatch(r'\d+\.png', f) and int(f[:-4]) >= n:
                os.remove(os.path.join(d, 'samples', f))
                stale.add(d)
    render(model, jobs, steps, cfg, size, batch, 'geneval')
    if grid:                                                   # from the saved samples: no regeneration
        for i in range(len(lines)):
            d = os.path.join(out, f'{i:05d}')
            g = os.path.join(d, 'grid.png')
            if os.path.isfile(g) and d not in stale and all(os.path.getmtime(os.path.join(d, 'samples', f'{k:04d}.png'))
                                                            <= os.path.getmtime(g) for k in range(n)):
                continue                                       # up to date
            ims = np.stack([np.asarray(Image.open(os.path.join(d, 'samples', f'{k:04d}.png')).convert('RGB'))
                            for k in range(n)])                                          # [n, H, W, 3]
            ims = torch.from_numpy(ims).permute(0, 3, 1, 2).float() / 255              # [n, 3, H, W]
            sample.save_png(sample.grid(ims, min(n, 4)), g)
    return len(lines)


def read_dpg(path):
    """DPG-Bench prompts: a folder of <id>.txt files, or a jsonl whose rows carry the DPG item id ("id"):
    the evaluator finds each item's image by that id, so line numbers would match nothing."""
    if os.path.isdir(path):
        rows = [{'id': f[:-4], 'prompt': open(os.path.join(path, f), encoding='utf-8').read().strip()}
                for f in sorted(os.listdir(path)) if f.endswith('.txt')]
        if not rows:
            raise ValueError(f"{path} holds no <id>.txt prompt files")
        return rows
    rows = sample.read_prompts(path)
    raw = [json.loads(l) for l in open(path, encoding='utf-8') if l.strip()] if path.endswith('.jsonl') else []
    if len(raw) != len(rows) or any('id' not in r for r in raw):
        raise ValueError(f"{path}: DPG-Bench needs each prompt's item id: a jsonl with an 'id' in every row, "
                         f"or the folder of <id>.txt prompt files")
    return rows


def export_dpg(model, rows, out, steps=50, cfg=4.0, size=1024, seed=0, batch=GEN_BATCH):
    """DPG-Bench: OUT/<id>.png, a 2x2 grid of 4 samples (seeds seed .. seed + 3) per prompt."""
    from tqdm import tqdm
    os.makedirs(out, exist_ok=True)
    clean_tmp([out])
    todo = [(n, r) for n, r in zip(unique_names(rows), rows) if not os.path.isfile(os.path.join(out, f'{n}.png'))]
    m = (model() if callable(model) else model) if todo else None
    for n, r in tqdm(todo, desc='dpg'):
        imgs, _ = sample.generate(m, [r['prompt']] * 4, [seed + k for k in range(4)], steps, cfg, size, size, '', batch)
        sample.save_png(sample.grid(imgs, 2), os.path.join(out, f'{n}.png'))
    return len(rows)


def export_tiif(model, prompts, out, model_name, steps=50, cfg=4.0, size=1024, seed=0, batch=GEN_BATCH):
    """TIIF-Bench: OUT/<type>/<model_name>/{short,long}_description/<i>.png, i = the 0-based index of the row
    within its type (its line index in that type's file). prompts: a jsonl file or a folder of them."""
    files = sorted(os.path.join(prompts, f) for f in os.listdir(prompts) if f.endswith('.jsonl')) \
        if os.path.isdir(prompts) else [prompts]
    per_type, jobs = {}, []
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path} not found")
        for ln, line in enumerate(open(path, encoding='utf-8'), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                typ, texts = row['type'], {k: row[k] for k in ('short_description', 'long_description')}
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{ln}: a TIIF row needs type, short_description, long_description") from None
            if not isinstance(typ, str) or not typ.strip() or typ in ('.', '..') or re.search(r'[/\\\x00]', typ):
                raise ValueError(f"{path}:{ln}: type {typ!r} cannot be a folder name")
            i = per_type.setdefault(typ, 0)
            per_type[typ] += 1
            # the folder is the type verbatim ("action+2d"): TIIF's evaluator joins image_dir and the type as is
            jobs += [(os.path.join(out, typ, model_name, k, f'{i}.png'), t, seed + i) for k, t in texts.items()]
    render(model, jobs, steps, cfg, size, batch, 'tiif')
    return per_type


# -----------------------------------------------------------------------------
def main(a):
    for f in (a.lora, getattr(a, 'base_lora', '')):        # before any image is made, in every subcommand
        if f and not os.path.isfile(f):
            raise FileNotFoundError(f"LoRA file {f} not found")
    dev, dtype = device_dtype()
    if a.cmd == 'toy':
        print("toy:", json.dumps(toy_main(a), indent=2))
        return
    if a.cmd == 'export':
        model = functools.cache(lambda: load_t2i(a.model, a.lora, dev, dtype))
        kw = dict(steps=a.steps, cfg=a.cfg, size=a.size, seed=a.seed, batch=a.batch)
        if a.bench == 'geneval':
            res = export_geneval(model, a.prompts, a.out, a.n, grid=not a.no_grid, **kw)
        elif a.bench == 'dpg':
            res = export_dpg(model, read_dpg(a.prompts), a.out, **kw)
        else:
            res = export_tiif(model, a.prompts, a.out, a.model_name, **kw)
        print(f"{a.bench}: {res} prompts -> {a.out}")
        if a.bench == 'dpg':
            print(f"score with DPG-Bench's compute_dpg_bench.py --image-root-path {a.out} --resolution {a.size} "
                  f"--pic-num 4")
        return
    try:
        rows = sample.read_prompts(a.prompts)[:a.n]
    except ValueError as e:
        raise ValueError(f"{e}\n(DenseAlignBench's metadata.jsonl has 'caption' fields: convert it first with "
                         f"python data_prep.py import {a.prompts} --out dab.jsonl)") from None
    for d in [a.vlm] + ([a.judge[6:]] if a.judge.startswith('local:') else []):
        if d and not os.path.isdir(d):
            raise FileNotFoundError(f"VLM directory {d} not found")
    res = run_densealign(rows, a.out, a.base, a.lora, a.base_lora, a.judge, a.judge_model, None, a.vlm,
                         a.steps, a.cfg, a.size, a.seed, dev, dtype, a.batch)
    print(format_table(res))
    print(f"per-item judgements: {os.path.join(a.out, 'judgements.jsonl')}; summary: {os.path.join(a.out, 'summary.json')}")


def toy_main(a):
    if min(a.n, a.k, a.stride) < 1:
        raise ValueError(f"--n {a.n}, --k {a.k} and --stride {a.stride} must be >= 1")
    keep = None
    if a.meanings != 'all':                           # split by whether the policy was pretrained on the meaning
        import toy
        seen = toy.pretraining_meanings(a.toy_dir)
        keep = lambda p: (tuple(toy.parse_caption(p)) in seen) == (a.meanings == 'pretrained')
    run = functools.partial(toy_metrics, os.path.join(a.toy_dir, 'zimage'), a.vlm or os.path.join(a.toy_dir, 'vlm'),
                            a.prompts or os.path.join(a.toy_dir, 'heldout.jsonl'), n=a.n, k=a.k, steps=a.steps,
                            cfg=a.cfg, size=a.size, seed=a.seed, query=a.query, stride=a.stride, keep=keep)
    res = {'base': run()}
    if a.lora:
        res['trained'] = run(lora=a.lora)
    os.makedirs(a.out, exist_ok=True)
    reward.write_json(res, os.path.join(a.out, 'summary.json'))
    return res


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    d = sub.add_parser('densealign', help="pairwise judging of baseline vs trained images on held-out captions")
    d.add_argument('--prompts', required=True, help="held-out captions (.jsonl with 'prompt', or .txt)")
    d.add_argument('--base', required=True, help="diffusers model directory")
    d.add_argument('--lora', default='', help="LoRA of the trained model")
    d.add_argument('--base_lora', default='', help="LoRA of the baseline (default: the plain base model)")
    d.add_argument('--judge', default='', help="local:VLM_DIR or http(s)://host/v1 (OpenAI-compatible)")
    d.add_argument('--judge_model', default='', help="model name for an HTTP judge")
    d.add_argument('--vlm', default='', help="also report the mean PromptEcho reward of both models with this VLM")
    d.add_argument('--n', type=int, default=2000, help="first n captions")
    d.add_argument('--out', default='out/densealign')
    e = sub.add_parser('export', help="images in the folder layout of an official benchmark evaluator")
    e.add_argument('--bench', required=True, choices=['geneval', 'dpg', 'tiif'])
    e.add_argument('--prompts', required=True, help="geneval: evaluation_metadata.jsonl; dpg: folder of <id>.txt "
                                                    "or jsonl; tiif: jsonl (or a folder of them)")
    e.add_argument('--model', required=True, help="diffusers model directory")
    e.add_argument('--lora', default='')
    e.add_argument('--out', required=True)
    e.add_argument('--n', type=int, default=4, help="geneval: samples per prompt")
    e.add_argument('--no_grid', action='store_true', help="geneval: skip grid.png")
    e.add_argument('--model_name', default='promptecho', help="tiif: the model folder name")
    t = sub.add_parser('toy', help="the toy world's exact metrics for the base and a trained policy")
    t.add_argument('--toy_dir', default='out/toy')
    t.add_argument('--lora', default='')
    t.add_argument('--vlm', default='', help="default: TOY_DIR/vlm")
    t.add_argument('--prompts', default='', help="prompts file (default: TOY_DIR/heldout.jsonl; a train file probes the base)")
    t.add_argument('--stride', type=int, default=1, help="use every stride-th prompt of the file")
    t.add_argument('--meanings', default='all', choices=['all', 'pretrained', 'new'],
                   help="only prompts whose meaning the policy was (pretrained) or was not (new) pretrained on")
    t.add_argument('--n', type=int, default=64)
    t.add_argument('--k', type=int, default=4)
    t.add_argument('--query', default=reward.QUERY, help="the reward's query for the agreement, for rows without a 'query' (query ablations)")
    t.add_argument('--out', default='out/eval')
    for p in (d, e, t):
        p.add_argument('--steps', type=int, default=12 if p is t else 50)
        p.add_argument('--cfg', type=float, default=3.5 if p is t else 4.0)
        p.add_argument('--size', type=int, default=64 if p is t else 1024)
        p.add_argument('--seed', type=int, default=0)
    for p in (d, e):
        p.add_argument('--batch', type=int, default=GEN_BATCH, help="images per generate call")
    return ap


if __name__ == '__main__':
    args = parser().parse_args()
    if args.cmd == 'densealign' and not args.judge:
        parser().error("densealign needs --judge local:VLM_DIR or --judge http(s)://host/v1")
    try:
        main(args)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise SystemExit(f"error: {err}")
