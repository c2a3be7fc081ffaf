"""Tests of eval.py: judge bookkeeping, answer parsing, intervals, benchmark layouts, resume."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import sample


def _rows(n):
    return [{'id': str(i), 'prompt': f'prompt {i}'} for i in range(n)]


def _img(v):
    return Image.new('RGB', (8, 8), (v, v, v))


def test_swap_bookkeeping_cancels_position_bias(tmp_path):
    rows = _rows(400)
    always_left = lambda p, a, b: '{"reasoning": "left", "preference": "image_a"}'
    res = ev.run_densealign(rows, lambda i: _img(0), lambda i: _img(255), always_left, str(tmp_path / 'a'), seed=1)
    recs = [json.loads(l) for l in open(tmp_path / 'a' / 'judgements.jsonl')]
    n_swapped = sum(r['swapped'] for r in recs)
    assert res['win'] == n_swapped and res['loss'] == 400 - n_swapped     # left = trained exactly when swapped
    lo, hi = res['ci95_pp']
    assert lo <= 0 <= hi                                                  # a pure position bias nets ~0
    # a judge that sees which image is the trained one (white) always prefers it: 100% wins whatever the swaps
    pick_white = lambda p, a, b: 'image_a' if a.getpixel((0, 0))[0] == 255 else 'image_b'
    res = ev.run_densealign(rows, lambda i: _img(0), lambda i: _img(255), pick_white, str(tmp_path / 'b'), seed=1)
    assert res['win'] == 400 and res['net_pp'] == 100.0


def test_parse_judgement_messy_answers():
    assert ev.parse_judgement('```json\n{"reasoning": "a is closer", "preference": "image_a"}\n```') == 'image_a'
    assert ev.parse_judgement('Looking closely... {"preference": "tie", "reasoning": "same", "x": 1} done') == 'tie'
    assert ev.parse_judgement('I prefer image_b because the dog is red.') == 'image_b'
    assert ev.parse_judgement('both image_a and image_b have merits') is None      # ambiguous
    assert ev.parse_judgement('no idea') is None
    assert ev.parse_judgement('{"preference": "image_c"}') is None


def test_interval_on_known_counts():
    res = ev.summarize([1] * 60 + [-1] * 30 + [0] * 10 + [None] * 5)
    assert (res['win'], res['loss'], res['tie'], res['invalid'], res['valid']) == (60, 30, 10, 5, 100)
    assert abs(res['net_pp'] - 30.0) < 1e-9
    mean = 0.3
    sd = math.sqrt((60 * (1 - mean) ** 2 + 30 * (-1 - mean) ** 2 + 10 * mean ** 2) / 99)   # by hand
    assert np.allclose(res['ci95_pp'], (100 * (mean - 1.96 * sd / 10), 100 * (mean + 1.96 * sd / 10)))


def test_resume_neither_regenerates_nor_rejudges(t2i_dir, tmp_path):
    m = sample.load_model(t2i_dir('zimage'))
    rows = _rows(3)
    calls = []

    def judge(p, a, b):
        calls.append(p)
        return 'garbage' if len(calls) == 1 else '{"preference": "tie"}'    # first answer malformed: retried
    for attempt in range(2):
        base = ev.cached_images(m, rows, str(tmp_path / 'images' / 'base'), 2, 4.0, 32, 0)
        mt = os.path.getmtime(tmp_path / 'images' / 'base' / '0.png')
        res = ev.run_densealign(rows, base, base, judge, str(tmp_path), seed=0)
        if attempt == 0:
            assert len(calls) == 4 and res['tie'] == 3                     # 3 items + 1 retry
            first_mtime = mt
    assert len(calls) == 4 and mt == first_mtime                          # second run: no judge call, no image


def test_export_layouts(t2i_dir, tmp_path):
    m = sample.load_model(t2i_dir('zimage'))
    gen = tmp_path / 'geneval.jsonl'
    src = os.path.join(os.path.dirname(__file__), '..', 'shared', 'data', 'geneval_evaluation_metadata.jsonl')
    lines = open(src).read().splitlines()[:2] if os.path.isfile(src) else [
        json.dumps({'tag': 'single_object', 'include': [{'class': 'cat', 'count': 1}], 'prompt': 'a photo of a cat'})] * 2
    gen.write_text('\n'.join(lines) + '\n')
    ev.export_geneval(m, str(gen), str(tmp_path / 'g'), n=2, steps=2, size=32)
    for i, line in enumerate(lines):
        d = tmp_path / 'g' / f'{i:05d}'
        assert (d / 'metadata.jsonl').read_text() == line + '\n'           # verbatim
        assert sorted(os.listdir(d / 'samples')) == ['0000.png', '0001.png']
    ev.export_dpg(m, [{'id': 'p7', 'prompt': 'a red dog'}], str(tmp_path / 'd'), steps=2, size=32)
    assert Image.open(tmp_path / 'd' / 'p7.png').size == (64, 64)        # 2x2 grid of 32px samples
    tiif = tmp_path / 't.jsonl'
    tiif.write_text('\n'.join(json.dumps({'type': t, 'short_description': 'a dog', 'long_description': 'a red dog'})
                              for t in ('color', 'color', 'text')) + '\n')
    ev.export_tiif(m, str(tiif), str(tmp_path / 'ti'), 'ours', steps=2, size=32)
    for t, i in (('color', 0), ('color', 1), ('text', 0)):
        for k in ('short_description', 'long_description'):
            assert (tmp_path / 'ti' / t / 'ours' / k / f'{i}.png').is_file()


# -----------------------------------------------------------------------------
# data_prep.py

import data_prep


def test_caption_folder_corrupt_filter_and_resume(vlm_dir, tmp_path):
    import reward
    root = tmp_path / 'imgs'
    (root / 'sub').mkdir(parents=True)
    for n, c in (('a.png', 10), ('sub/b.jpg', 200), ('c.webp', 90)):
        Image.new('RGB', (40, 40), (c, c, c)).save(root / n)
    (root / 'broken.png').write_bytes(b'not an image')
    model, proc = reward.load_vlm(vlm_dir('qwen3'))
    raw = str(tmp_path / 'cap_raw.jsonl')
    data_prep.caption_folder(str(root), raw, lambda ims: data_prep.vlm_captions(model, proc, ims, max_new_tokens=5), 2)
    rows = [json.loads(l) for l in open(raw)]
    assert sorted(r['image'] for r in rows) == ['a.png', 'broken.png', 'c.webp', 'sub/b.jpg']
    assert [r['image'] for r in rows if 'error' in r] == ['broken.png']
    calls = []
    data_prep.caption_folder(str(root), raw, lambda ims: calls.append(ims) or [], 2)   # resume: nothing left
    assert calls == [] and len(open(raw).readlines()) == 4
    # filtering on controlled captions: one too short, one duplicate, one kept
    with open(raw, 'w') as f:
        for img, cap in (('a', 'word ' * 5), ('b', 'long caption ' * 3), ('c', 'Long caption ' * 3), ('d', None)):
            f.write(json.dumps({'image': img, 'caption': cap} if cap else {'image': img, 'error': 'bad'}) + '\n')
    s = data_prep.filter_split(raw, str(tmp_path / 'cap'), min_words=6, max_words=10, test_size=0)
    assert s['dropped'] == {'unreadable': 1, 'too_short': 1, 'too_long': 0, 'duplicate': 1} and s['kept'] == 1
    assert [json.loads(l)['id'] for l in open(tmp_path / 'cap_train.jsonl')] == ['b']


def test_import_formats_and_ocr(tmp_path):
    (tmp_path / 'p.txt').write_text('a red dog\n\na blue cat\n')
    assert [r['prompt'] for r in data_prep.import_prompts(str(tmp_path / 'p.txt'))] == ['a red dog', 'a blue cat']
    (tmp_path / 'p.jsonl').write_text(json.dumps({'caption': 'a long caption'}) + '\n')
    assert data_prep.import_prompts(str(tmp_path / 'p.jsonl'))[0] == {'prompt': 'a long caption', 'id': '0'}
    (tmp_path / 'p.csv').write_text('id,prompt\nx1,"a cat, sitting"\n')
    assert data_prep.import_prompts(str(tmp_path / 'p.csv'))[0]['prompt'] == 'a cat, sitting'
    (tmp_path / 'o.txt').write_text('A poster titled "SUMMER SALE" with the line \u201cup to 50% off\u201d and "shop now"\n')
    row = data_prep.import_prompts(str(tmp_path / 'o.txt'), ocr=True)[0]
    assert json.loads(row['label']) == {'main_title': ['SUMMER SALE'], 'subtitle': ['up to 50% off'],
                                        'selling_points': [], 'other_text': ['shop now']}
    import reward
    assert row['query'] == reward.OCR_QUERY


def test_http_judge_on_loopback_with_retries(tmp_path):
    """An OpenAI-compatible endpoint on 127.0.0.1: a 500 first (retried), then answers with two images."""
    import http.server
    import threading
    seen = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
            seen.append(body)
            if len(seen) == 1:
                self.send_response(500); self.end_headers(); return
            msg = json.dumps({'choices': [{'message': {'content': '{"preference": "image_b", "reasoning": "x"}'}}]})
            self.send_response(200); self.send_header('Content-Type', 'application/json'); self.end_headers()
            self.wfile.write(msg.encode())

        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer(('127.0.0.1', 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        judge = ev.http_judge(f'http://127.0.0.1:{srv.server_port}/v1', 'judge-model')
        assert ev.parse_judgement(judge('a red dog', _img(0), _img(255))) == 'image_b'
    finally:
        srv.shutdown()
    assert len(seen) == 2 and seen[1]['temperature'] == 0.3 and seen[1]['model'] == 'judge-model'
    parts = seen[1]['messages'][0]['content']
    assert [p['type'] for p in parts] == ['text', 'image_url', 'image_url'] and 'a red dog' in parts[0]['text']


def test_local_judge_counts_malformed_as_invalid(vlm_dir, tmp_path):
    judge = ev.local_judge(vlm_dir('qwen3'))                      # a random tiny VLM: it babbles
    answer = judge('a red dog', _img(0), _img(255))
    assert isinstance(answer, str)
    res = ev.run_densealign(_rows(2), lambda i: _img(0), lambda i: _img(255), judge, str(tmp_path), seed=0)
    recs = [json.loads(l) for l in open(tmp_path / 'judgements.jsonl')]
    for r in recs:                                                # never dropped: counted, with every answer kept
        assert (r['preference'] is None) == (r['outcome'] is None) and 1 <= len(r['answers']) <= ev.JUDGE_RETRIES
    assert res['invalid'] == sum(r['preference'] is None for r in recs) and res['n'] == 2
