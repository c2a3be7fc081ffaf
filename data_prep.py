"""
Training data for PromptEcho: captions only, written by the reward's own VLM with the reward's own query.

The paper captions ~100K concept-rich images with "Describe this image in detail." (200-400 words), so
the labels come from the same distribution the reward scores; 2000 captions from the same source, not
trained on, form the test set (DenseAlignBench). After captioning the images are not needed.

    python data_prep.py caption IMAGE_DIR --vlm DIR --out data/captions.jsonl
        # -> data/captions.jsonl (raw, one row per image, appended as it goes; a rerun resumes),
        #    data/captions_train.jsonl, data/captions_test.jsonl, data/captions_summary.json
    python data_prep.py import densealignbench_metadata.jsonl --out data/dab.jsonl
    python data_prep.py import posters.txt --ocr --out data/posters.jsonl      # text-rendering rows

Output rows are the project's prompt format: {"prompt": ..., "id": ...} (+ "label", "query" with --ocr).
"""
import argparse
import csv
import hashlib
import json
import os
import re
from collections import Counter

import torch
from PIL import Image

import reward

MIN_WORDS = 200           # captions shorter than this are dropped (paper: 200-400 words)
MAX_WORDS = 400           # captions longer than this are dropped
IMAGE_ERRORS = (ValueError, TypeError, OSError)   # what a processor raises for an image it cannot take
TEST_SIZE = 2000          # held-out captions (the DenseAlignBench size)
BATCH = 8                 # images per generate call
MAX_NEW_TOKENS = 600      # caption length cap in tokens (400 English words are about 520 tokens)
IMAGE_EXT = ('.jpg', '.jpeg', '.png', '.webp')  # what counts as an image (case-insensitive)
HIST_BIN = 50             # words per bin of the printed length histogram


# -----------------------------------------------------------------------------
# files

def list_images(root):
    """Image paths under root, relative to it, recursive, sorted."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} not found")
    return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, '/')
                  for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(IMAGE_EXT))



def write_jsonl(rows, path):
    """Atomic jsonl write (temp file + os.replace)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
    os.replace(path + '.tmp', path)


def image_id(relpath):
    """A caption's id, usable as a file name: the image path with '/' and odd characters as '_'."""
    return re.sub(r'[^\w.\-]', '_', relpath)


# -----------------------------------------------------------------------------
# captioning

def vlm_captions(model, processor, images, query=reward.QUERY, max_new_tokens=MAX_NEW_TOKENS):
    """Greedy captions of PIL images; the user turn is [image] + query, as in the reward."""
    return reward.generate_text(model, processor, [[im] for im in images], [query] * len(images), 0.0, max_new_tokens)


def caption_folder(root, raw_path, caption_fn, batch=BATCH):
    """Append one row per image not yet in raw_path: {"image": relpath, "caption": ...}, or {"image", "error"}
    for a file that cannot be read or captioned (listed, not fatal; delete its line to retry it). Written and
    flushed per batch, so a killed run loses at most one batch. caption_fn(list of PIL) -> list of str.
    Returns the new rows."""
    from tqdm import tqdm
    old = reward.read_jsonl(raw_path)
    bad = next((i for i, r in enumerate(old, 1) if not isinstance(r, dict) or 'image' not in r), None)
    if bad:
        raise ValueError(f"{raw_path}:{bad}: not a captions row (no 'image'); is this the right --out?")
    done = {r['image'] for r in old}
    todo = [p for p in list_images(root) if p not in done]
    os.makedirs(os.path.dirname(os.path.abspath(raw_path)), exist_ok=True)
    new = []
    for i in tqdm(range(0, len(todo), batch), desc='captioning', disable=not todo):
        rows, ims, names = [], [], []
        for p in todo[i:i + batch]:
            try:
                with Image.open(os.path.join(root, p)) as im:
                    ims.append(im.convert('RGB'))          # decodes the whole file: truncated ones fail here
                names.append(p)
            except Exception as e:                          # any decoder error: record it, go on
                rows.append({'image': p, 'error': f'{type(e).__name__}: {e}'})
        try:
            caps = caption_fn(ims) if ims else []
        except IMAGE_ERRORS:                                # an image the VLM's processor refuses (e.g. an extreme
            caps = []                                       # aspect ratio): caption them one by one, list the bad
            for p, im in zip(names, ims):                   # ones. Other errors (out of memory, ...) stop the run
                try:                                        # with nothing of the batch written: a rerun resumes
                    caps += caption_fn([im])
                except IMAGE_ERRORS as e:
                    caps.append(None)
                    rows.append({'image': p, 'error': f'{type(e).__name__}: {e}'})
        if len(caps) != len(ims):
            raise ValueError(f"caption_fn returned {len(caps)} captions for {len(ims)} images")
        rows += [{'image': p, 'caption': c} for p, c in zip(names, caps) if c is not None]
        reward.append_jsonl(raw_path, rows)
        new += rows
    return new


# -----------------------------------------------------------------------------
# filtering and the split

def split_hash(image):
    """Where an image falls in the split: sha1 of its path (independent of file order and of RNG state)."""
    return hashlib.sha1(image.encode('utf-8')).hexdigest()


def histogram(lengths, width=HIST_BIN):
    """{'lo-hi': count} over bins of `width` words, from 0 to the longest."""
    if not lengths:
        return {}
    return {f'{lo}-{lo + width - 1}': sum(lo <= n < lo + width for n in lengths)
            for lo in range(0, max(lengths) + 1, width)}


def filter_split(raw_path, out_stem, min_words=MIN_WORDS, max_words=MAX_WORDS, test_size=TEST_SIZE):
    """Raw captions -> OUT_train.jsonl and OUT_test.jsonl in the prompt format {"prompt", "id", "image"}.
    Drops, in this order: unreadable images, captions outside [min_words, max_words] words, exact duplicates
    of a caption already kept (after stripping outer whitespace; rows are visited in path-hash order, so
    which copy stays does not depend on file order). Test = the kept rows with the test_size smallest
    path hashes; both files are in hash order. When the corpus only grows (no row dropped or re-captioned,
    no new caption repeating an old one), the test threshold can only fall: old test rows may move to
    train, but no old train row ever moves to test, so a model trained on an earlier train split is
    never tested on its own training captions. Returns the summary (also
    OUT_summary.json)."""
    rows = {}
    for r in reward.read_jsonl(raw_path):
        rows[r['image']] = r                                   # the last row of an image counts
    why = {'unreadable': 0, 'too_short': 0, 'too_long': 0, 'duplicate': 0}
    kept, seen = [], set()
    for r in sorted(rows.values(), key=lambda r: split_hash(r['image'])):   # hash order: input order never matters
        if 'error' in r:
            why['unreadable'] += 1
            continue
        cap = r['caption'].strip()
        n = len(cap.split())
        if n < min_words:
            why['too_short'] += 1
        elif n > max_words:
            why['too_long'] += 1
        elif cap in seen:
            why['duplicate'] += 1
        else:
            seen.add(cap)
            kept.append({'prompt': cap, 'id': image_id(r['image']), 'image': r['image']})
    n_id = Counter(r['id'] for r in kept)
    for r in kept:                                             # two paths that map to one id: disambiguate
        if n_id[r['id']] > 1:
            r['id'] += '-' + split_hash(r['image'])[:8]
    test, train = kept[:test_size], kept[test_size:]
    write_jsonl(train, out_stem + '_train.jsonl')
    write_jsonl(test, out_stem + '_test.jsonl')
    words = [len(r['caption'].split()) for r in rows.values() if 'error' not in r]
    summary = {'images': len(rows), 'captioned': len(words), 'kept': len(kept), 'train': len(train),
               'test': len(test), 'dropped': why, 'min_words': min_words, 'max_words': max_words,
               'unreadable': [r['image'] for r in rows.values() if 'error' in r],
               'words_histogram': histogram(words)}
    reward.write_json(summary, out_stem + '_summary.json')
    return summary


def format_summary(s):
    """The summary as text: counts, why rows were dropped, and a caption-length histogram."""
    d = s['dropped']
    lines = [f"{s['images']} images, {s['captioned']} captioned; kept {s['kept']} "
             f"(train {s['train']}, test {s['test']})",
             f"dropped: {d['too_short']} too short (< {s['min_words']} words), {d['too_long']} too long "
             f"(> {s['max_words']} words), {d['duplicate']} duplicate, {d['unreadable']} unreadable"]
    lines += [f"  unreadable: {p}" for p in s['unreadable'][:20]]
    if len(s['unreadable']) > 20:
        lines.append(f"  ... and {len(s['unreadable']) - 20} more (see the raw file's 'error' rows)")
    if s['words_histogram']:
        lines.append("caption length (words), all captions:")
        top = max(s['words_histogram'].values()) or 1
        lines += [f"  {k:>9s} {v:7d} {'#' * round(40 * v / top)}" for k, v in s['words_histogram'].items()]
    return '\n'.join(lines)


def caption_paths(out):
    """--out captions.jsonl -> (raw path, stem): stem_train.jsonl, stem_test.jsonl, stem_summary.json."""
    stem = out[:-len('.jsonl')] if out.endswith('.jsonl') else out
    return stem + '.jsonl', stem


# -----------------------------------------------------------------------------
# importing prompt lists

def ocr_texts(prompt):
    """The designed text of a poster prompt, by a simple rule: the quoted strings ("..." or \u201c...\u201d),
    in order; the first is the main title, the second the subtitle, the rest other text. (No selling points:
    a rule cannot tell them from other text; write labels by hand where that matters.)"""
    q = [a or b for a, b in re.findall(r'"([^"]+)"|\u201c([^\u201d]+)\u201d', prompt)]
    return {'main_title': q[:1], 'subtitle': q[1:2], 'selling_points': [], 'other_text': q[2:]}


def import_prompts(path, ocr=False):
    """.txt (one prompt per line), .jsonl (a 'prompt' or 'caption' field; other fields kept) or .csv
    (a 'prompt' or 'caption' column) -> rows {"prompt", "id", ...}. id: the row's own 'id' if it has one,
    else its 0-based index. ocr=True adds "label" (reward.ocr_label of ocr_texts) and "query" (reward.OCR_QUERY)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} not found")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding='utf-8-sig', newline='' if ext == '.csv' else None) as f:
        if ext == '.jsonl':
            src = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        src.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        elif ext == '.csv':
            src = list(csv.DictReader(f))
        elif ext == '.txt':
            src = [{'prompt': l.strip()} for l in f if l.strip()]
        else:
            raise ValueError(f"{path}: unknown prompt file type {ext!r}; use .txt, .jsonl or .csv")
    rows = []
    for i, r in enumerate(src):
        text = r.get('prompt') or r.get('caption') if isinstance(r, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: row {i} has no non-empty 'prompt' or 'caption' field")
        used = 'prompt' if r.get('prompt') else 'caption'        # the field that became the prompt is not kept twice
        rid = r.get('id')
        row = {k: v for k, v in r.items() if k != used} | {'prompt': text.strip(),
                                                           'id': str(i if rid is None or rid == '' else rid)}
        if ocr:
            row['label'], row['query'] = reward.ocr_label(ocr_texts(text)), reward.OCR_QUERY
        rows.append(row)
    ids = [r['id'] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: ids are not unique (e.g. {next(x for x in ids if ids.count(x) > 1)!r})")
    return rows


# -----------------------------------------------------------------------------
def main(a):
    if a.cmd == 'caption':
        raw, stem = caption_paths(a.out)
        list_images(a.images)                                  # a bad folder fails before the VLM loads
        if not os.path.isdir(a.vlm):
            raise FileNotFoundError(f"VLM directory {a.vlm} not found")
        dev = 'cuda' if torch.cuda.is_available() else 'cpu'
        model, proc = reward.load_vlm(a.vlm, dev, torch.bfloat16 if dev == 'cuda' else torch.float32)
        new = caption_folder(a.images, raw, lambda ims: vlm_captions(model, proc, ims, max_new_tokens=a.max_new_tokens),
                             a.batch)
        print(f"captioned {sum('caption' in r for r in new)} new images ({sum('error' in r for r in new)} unreadable) "
              f"-> {raw}")
        print(format_summary(filter_split(raw, stem, test_size=a.test_size)))
        print(f"wrote {stem}_train.jsonl, {stem}_test.jsonl, {stem}_summary.json")
    else:
        rows = import_prompts(a.file, a.ocr)
        write_jsonl(rows, a.out)
        extra = ''
        if a.ocr:
            extra = f" ({sum(r['label'] == reward.ocr_label({}) for r in rows)} without any quoted text)"
        print(f"wrote {len(rows)} prompts to {a.out}{extra}")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser('caption', help="caption a folder of images with the VLM, filter, split train/test")
    c.add_argument('images', help="folder of images (jpg/jpeg/png/webp, searched recursively)")
    c.add_argument('--vlm', required=True, help="transformers VLM directory (the reward's VLM)")
    c.add_argument('--out', required=True, help="raw captions file, e.g. data/captions.jsonl")
    c.add_argument('--test_size', type=int, default=TEST_SIZE)
    c.add_argument('--batch', type=int, default=BATCH)
    c.add_argument('--max_new_tokens', type=int, default=MAX_NEW_TOKENS)
    i = sub.add_parser('import', help="a prompt list (.txt / .jsonl / .csv) -> the project's prompt jsonl")
    i.add_argument('file')
    i.add_argument('--out', required=True)
    i.add_argument('--ocr', action='store_true', help="add the text-rendering label and query (quoted strings)")
    try:
        main(ap.parse_args())
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
