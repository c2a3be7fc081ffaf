"""
Training data for PromptEcho: captions only, written by the reward's own VLM and query.

    python data_prep.py caption IMAGE_DIR --vlm DIR --out data/captions      # -> _raw / _train / _test .jsonl
    python data_prep.py import densealignbench_metadata.jsonl --out data/dab.jsonl
    python data_prep.py import posters.txt --ocr --out data/posters.jsonl   # text-rendering rows

The paper captions ~100K concept-rich images with "Describe this image in detail." (200-400
words), so the labels come from the same distribution the reward scores; 2000 held out form
DenseAlignBench. Captioning is resumable: the raw file is appended batch by batch and a rerun
skips images already in it (a killed run loses at most one batch).
"""
import argparse
import csv
import hashlib
import json
import os
import re

import torch
from PIL import Image

import reward

MIN_WORDS, MAX_WORDS = 200, 400   # keep captions of this length (the paper's 200-400 words)
TEST_SIZE = 2000                  # held-out captions (DenseAlignBench size)
BATCH = 8                         # images per generate call
MAX_NEW_TOKENS = 700              # ~400 words
IMAGE_EXT = ('.jpg', '.jpeg', '.png', '.webp')


def list_images(root):
    if not os.path.isdir(root):
        raise SystemExit(f"image folder {root} not found")
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                  for f in fs if f.lower().endswith(IMAGE_EXT))


@torch.no_grad()
def vlm_captions(model, processor, images, query=reward.QUERY, max_new_tokens=MAX_NEW_TOKENS):
    """Greedy captions of PIL images, user turn = [image] + query."""
    text = processor.apply_chat_template([{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': query}]}],
                                         tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text] * len(images), images=images, return_tensors='pt', padding=True, padding_side='left')
    enc = {k: v.to(model.device) for k, v in enc.items()}
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
    return [processor.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out[:, enc['input_ids'].shape[1]:]]


def caption_folder(root, raw_path, caption_fn, batch=BATCH):
    """Append {"image", "caption"} (or {"image", "error"}) rows for images not yet in raw_path."""
    from tqdm import tqdm
    done = set()
    if os.path.isfile(raw_path):
        done = {json.loads(l)['image'] for l in open(raw_path, encoding='utf-8') if l.strip()}
    todo = [p for p in list_images(root) if p not in done]
    os.makedirs(os.path.dirname(os.path.abspath(raw_path)), exist_ok=True)
    for i in tqdm(range(0, len(todo), batch), desc='captioning'):
        rows, ims, names = [], [], []
        for p in todo[i:i + batch]:
            try:
                with Image.open(os.path.join(root, p)) as im:
                    ims.append(im.convert('RGB'))
                names.append(p)
            except Exception as e:                           # unreadable: listed, not fatal
                rows.append({'image': p, 'error': f'{type(e).__name__}: {e}'})
        rows += [{'image': p, 'caption': c} for p, c in zip(names, caption_fn(ims) if ims else [])]
        with open(raw_path, 'a', encoding='utf-8') as f:      # one batch per write: a kill loses at most this batch
            f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
            f.flush()
            os.fsync(f.fileno())


def filter_split(raw_path, out_prefix, min_words=MIN_WORDS, max_words=MAX_WORDS, test_size=TEST_SIZE):
    """Filter by length, drop duplicates, split train/test by a hash of the image path. Returns the summary."""
    rows = [json.loads(l) for l in open(raw_path, encoding='utf-8') if l.strip()]
    why = {'unreadable': 0, 'too_short': 0, 'too_long': 0, 'duplicate': 0}
    kept, seen = [], set()
    for r in rows:
        if 'error' in r:
            why['unreadable'] += 1
            continue
        n = len(r['caption'].split())
        key = ' '.join(r['caption'].lower().split())
        if n < min_words:
            why['too_short'] += 1
        elif n > max_words:
            why['too_long'] += 1
        elif key in seen:
            why['duplicate'] += 1
        else:
            seen.add(key)
            kept.append(r)
    kept.sort(key=lambda r: hashlib.sha1(r['image'].encode()).hexdigest())   # deterministic, order-free split
    test, train = kept[:test_size], kept[test_size:]
    for name, part in (('train', train), ('test', test)):
        path = f'{out_prefix}_{name}.jsonl'
        with open(path + '.tmp', 'w', encoding='utf-8') as f:
            f.writelines(json.dumps({'prompt': r['caption'], 'id': r['image']}, ensure_ascii=False) + '\n' for r in part)
        os.replace(path + '.tmp', path)
    lengths = [len(r['caption'].split()) for r in kept]
    hist = {f'{lo}-{lo + 49}': sum(lo <= n < lo + 50 for n in lengths) for lo in range(min_words, max_words + 1, 50)}
    return {'images': len(rows), 'kept': len(kept), 'train': len(train), 'test': len(test), 'dropped': why,
            'unreadable': [r['image'] for r in rows if 'error' in r], 'words_histogram': hist}


def ocr_texts(prompt):
    """The designed text of a poster prompt by a simple rule: quoted strings ("..." or curly quotes) in order;
    the first is the main title, the second the subtitle, the rest other text."""
    q = [a or b for a, b in re.findall(r'"([^"]+)"|\u201c([^\u201d]+)\u201d', prompt)]
    return {'main_title': q[:1], 'subtitle': q[1:2], 'selling_points': [], 'other_text': q[2:]}


def import_prompts(path, ocr=False):
    """txt (one per line), jsonl (a 'prompt' or 'caption' field; other fields kept) or csv -> project rows."""
    if not os.path.isfile(path):
        raise SystemExit(f"prompt file {path} not found")
    if path.endswith('.jsonl'):
        src = [json.loads(l) for l in open(path, encoding='utf-8') if l.strip()]
    elif path.endswith('.csv'):
        src = list(csv.DictReader(open(path, encoding='utf-8', newline='')))
    else:
        src = [{'prompt': l.strip()} for l in open(path, encoding='utf-8') if l.strip()]
    rows = []
    for i, r in enumerate(src):
        text = r.get('prompt') or r.get('caption')
        if not text:
            raise SystemExit(f"{path}: row {i} has no 'prompt' or 'caption' field")
        row = {**{k: v for k, v in r.items() if k != 'caption'}, 'prompt': text, 'id': str(r.get('id', i))}
        if ocr:
            row['label'], row['query'] = reward.ocr_label(ocr_texts(text)), reward.OCR_QUERY
        rows.append(row)
    return rows


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser('caption')
    c.add_argument('images')
    c.add_argument('--vlm', required=True)
    c.add_argument('--out', required=True, help="prefix: writes PREFIX_raw.jsonl, PREFIX_train.jsonl, PREFIX_test.jsonl")
    c.add_argument('--test_size', type=int, default=TEST_SIZE)
    c.add_argument('--batch', type=int, default=BATCH)
    i = sub.add_parser('import')
    i.add_argument('file')
    i.add_argument('--out', required=True)
    i.add_argument('--ocr', action='store_true', help="add the OCR label/query of the text-rendering variant")
    a = ap.parse_args()
    if a.cmd == 'caption':
        dev = 'cuda' if torch.cuda.is_available() else 'cpu'
        model, proc = reward.load_vlm(a.vlm, dev, torch.bfloat16 if dev == 'cuda' else torch.float32)
        caption_folder(a.images, a.out + '_raw.jsonl', lambda ims: vlm_captions(model, proc, ims), a.batch)
        print(json.dumps(filter_split(a.out + '_raw.jsonl', a.out, test_size=a.test_size), indent=2))
    else:
        rows = import_prompts(a.file, a.ocr)
        with open(a.out + '.tmp', 'w', encoding='utf-8') as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
        os.replace(a.out + '.tmp', a.out)
        print(f"wrote {len(rows)} prompts to {a.out}")
