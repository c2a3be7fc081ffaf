"""Tests of eval.py and data_prep.py: judge bookkeeping, answer parsing, intervals, benchmark layouts,
resume, captioning, filtering, the split and prompt import. Tiny random models from conftest.py."""
import base64
import hashlib
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data_prep
import eval as ev
import reward
import sample

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, '..', 'shared', 'data')


def _rows(n):
    return [{'id': str(i), 'prompt': f'prompt {i}'} for i in range(n)]


def _img(v):
    return Image.new('RGB', (8, 8), (v, v, v))


def _png(path):
    return np.asarray(Image.open(path).convert('RGB')).astype(int)


def _strict_json(path):
    """json.load that refuses NaN / Infinity (what other tools' strict parsers do)."""
    def bad(c):
        raise ValueError(f"{path} holds {c}")
    return json.load(open(path), parse_constant=bad)


# -----------------------------------------------------------------------------
# eval.py: bookkeeping

def test_swap_bookkeeping_cancels_position_bias(tmp_path):
    rows = _rows(400)
    always_left = lambda p, a, b: '{"reasoning": "left", "preference": "image_a"}'
    recs = ev.judge_pairs(rows, lambda i: _img(0), lambda i: _img(255), always_left, str(tmp_path / 'a'), seed=1)
    rng = random.Random(1)
    swaps = [rng.random() < 0.5 for _ in rows]                            # the documented draw, made here
    assert [r['swapped'] for r in recs] == swaps
    res = ev.summarize([r['outcome'] for r in recs])
    assert res['win'] == sum(swaps) and res['loss'] == 400 - sum(swaps)   # left = trained exactly when swapped
    lo, hi = res['ci95_pp']
    assert lo <= 0 <= hi                                                  # a pure position bias nets ~0
    # a judge that recognises the trained image (white) picks it wherever it is shown: 100% wins
    pick_white = lambda p, a, b: 'image_a' if a.getpixel((0, 0))[0] == 255 else 'image_b'
    recs = ev.judge_pairs(rows, lambda i: _img(0), lambda i: _img(255), pick_white, str(tmp_path / 'b'), seed=1)
    res = ev.summarize([r['outcome'] for r in recs])
    assert res['win'] == 400 and res['net_pp'] == 100.0 and res['win_rate'] == 1.0
    assert [json.loads(l)['winner'] for l in open(tmp_path / 'b' / 'judgements.jsonl')] == ['trained'] * 400


def test_parse_judgement_messy_answers():
    p = ev.parse_judgement
    assert p('```json\n{"reasoning": "a is closer", "preference": "image_a"}\n```') == 'image_a'
    assert p('Looking closely at both... {"preference": "tie", "reasoning": "same", "score": 3} done') == 'tie'
    assert p('{"reasoning": "B shows {two} cats, as asked", "preference": "image_b"}') == 'image_b'  # braces inside
    assert p('{"reasoning": "A", "preference": "Image A"}') == 'image_a'                           # spelling
    assert p("{'reasoning': 'the dog is red', 'preference': 'image_b'}") == 'image_b'              # single quotes
    assert p('{"reasoning": "an "unescaped" quote", "preference": "tie"}') == 'tie'                # broken JSON
    assert p('I prefer image_b because the dog is red.') == 'image_b'                              # bare word
    assert p('tie') == 'tie'
    assert p('both image_a and image_b have merits') is None                                       # ambiguous
    assert p('no idea') is None and p('') is None and p(None) is None
    assert p('{"preference": "image_c"}') is None
    assert p('{"reasoning": "cut off mid-sent') is None


def test_interval_on_known_counts():
    res = ev.summarize([1] * 60 + [-1] * 30 + [0] * 10 + [None] * 5)
    assert (res['win'], res['loss'], res['tie'], res['invalid'], res['valid'], res['n']) == (60, 30, 10, 5, 100, 105)
    assert (res['win_rate'], res['loss_rate'], res['tie_rate']) == (0.6, 0.3, 0.1)
    assert abs(res['invalid_rate'] - 5 / 105) < 1e-12
    assert abs(res['net_pp'] - 30.0) < 1e-9
    mean = 0.3                                                            # (60 - 30) / 100
    sd = math.sqrt((60 * (1 - mean) ** 2 + 30 * (-1 - mean) ** 2 + 10 * mean ** 2) / 99)
    assert np.allclose(res['ci95_pp'], [100 * (mean - 1.96 * sd / 10), 100 * (mean + 1.96 * sd / 10)])
    assert np.allclose(res['ci95_pp'], [12.27, 47.73], atol=0.01)          # sum sq 81, sd 0.9045: +-17.73 pp
    empty = ev.summarize([None, None])
    assert empty['net_pp'] is None and empty['invalid'] == 2 and empty['win_rate'] is None


# -----------------------------------------------------------------------------
# eval.py: judges

def test_http_judge_on_loopback_with_retries(monkeypatch):
    """An OpenAI-compatible endpoint on 127.0.0.1: a 500 first (retried), then an answer; a 401 fails at once."""
    import http.server
    import threading
    seen = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
            seen.append((self.path, dict(self.headers), body))
            if len(seen) == 1 or body['model'] == 'deny':
                self.send_response(500 if len(seen) == 1 else 401)
                self.end_headers()
                return
            msg = json.dumps({'choices': [{'message': {'content': '{"preference": "image_b", "reasoning": "x"}'}}]})
            self.send_response(200)
            self.send_header('Content-Type', 'application/json')
            self.end_headers()
            self.wfile.write(msg.encode())

        def log_message(self, *a):
            pass
    monkeypatch.setattr(ev, 'HTTP_BACKOFF', 0.01)
    monkeypatch.setenv(ev.JUDGE_KEY_ENV, 'sk-test')
    srv = http.server.HTTPServer(('127.0.0.1', 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        judge = ev.make_judge(f'http://127.0.0.1:{srv.server_port}/v1/', 'judge-model')
        assert ev.parse_judgement(judge('a red dog', _img(0), _img(255))) == 'image_b'
        n = len(seen)
        with pytest.raises(ConnectionError, match='401'):
            ev.http_judge(f'http://127.0.0.1:{srv.server_port}/v1', 'deny')('x', _img(0), _img(0))
        assert len(seen) == n + 1                                         # not retried
    finally:
        srv.shutdown()
    path, headers, body = seen[1]
    assert path == '/v1/chat/completions' and headers['Authorization'] == 'Bearer sk-test'
    assert body['temperature'] == 0.3 and body['model'] == 'judge-model'
    parts = body['messages'][0]['content']
    assert [q['type'] for q in parts] == ['text', 'image_url', 'image_url'] and 'a red dog' in parts[0]['text']
    sent = Image.open(io.BytesIO(base64.b64decode(parts[2]['image_url']['url'].split(',')[1])))
    assert sent.getpixel((0, 0)) == (255, 255, 255)                       # image_b is the second image
    with pytest.raises(ValueError, match='judge_model'):
        ev.make_judge('http://127.0.0.1:1/v1')
    with pytest.raises(ValueError, match='local:VLM_DIR'):
        ev.make_judge('gpt-4o')


def test_local_judge_counts_malformed_as_invalid(vlm_dir, tmp_path, monkeypatch):
    judge = ev.local_judge(vlm_dir('qwen3'), max_new_tokens=12)           # a random tiny VLM: it babbles
    seen, a, b = [], _img(0), _img(255)                                   # what it asks: image_a then image_b
    with monkeypatch.context() as mp:
        mp.setattr(ev.reward, 'generate_text', lambda m, p, ims, texts, temp, n: seen.append((ims, texts, temp)) or ['x'])
        judge('a red dog', a, b)
    assert seen[0][0][0][0] is a and seen[0][0][0][1] is b and len(seen[0][0][0]) == 2
    assert seen[0][1] == [ev.JUDGE_PROMPT.format(prompt='a red dog')] and seen[0][2] == ev.JUDGE_TEMPERATURE
    assert isinstance(judge('a red dog', _img(0), _img(255)), str)
    recs = ev.judge_pairs(_rows(2), lambda i: _img(0), lambda i: _img(255), judge, str(tmp_path), seed=0)
    for r in recs:                                                        # never dropped: counted, every answer kept
        assert (r['preference'] is None) == (r['outcome'] is None)
        parsed = [ev.parse_judgement(a) for a in r['answers']]
        if r['preference'] is None:                                       # asked 1 + RETRIES times, all malformed
            assert parsed == [None] * (1 + ev.JUDGE_RETRIES)
        else:                                                             # asked until the first valid answer
            assert parsed[-1] == r['preference'] and all(p is None for p in parsed[:-1])
    res = ev.summarize([r['outcome'] for r in recs])
    assert res['invalid'] == sum(r['preference'] is None for r in recs) and res['n'] == 2


def test_malformed_answers_retried_then_invalid(tmp_path):
    answers = iter(['garbage', 'more garbage', '{"preference": "tie"}'] + ['???'] * (1 + ev.JUDGE_RETRIES))
    recs = ev.judge_pairs(_rows(2), lambda i: _img(0), lambda i: _img(9), lambda *a: next(answers), str(tmp_path))
    assert recs[0]['preference'] == 'tie' and len(recs[0]['answers']) == 3
    assert recs[1]['winner'] == 'invalid' and len(recs[1]['answers']) == 1 + ev.JUDGE_RETRIES


# -----------------------------------------------------------------------------
# eval.py: the whole DenseAlignBench run, resumed

def test_densealign_resume_neither_regenerates_nor_rejudges(t2i_dir, vlm_dir, tmp_path):
    m = sample.load_model(t2i_dir('zimage'))
    sample.add_lora(m, 4, 4)
    with torch.no_grad():                                                 # a LoRA that changes the images
        for n, p in m.transformer.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.5)
    lora = str(tmp_path / 'lora.safetensors')
    sample.save_lora(m, lora)
    rows = [{'id': 'a/1', 'prompt': 'a red dog'}, {'id': 'b', 'prompt': 'a blue cat'},
            {'id': 'c', 'prompt': 'a dog', 'label': 'a green dog'}]
    calls = []

    def judge(prompt, a, b):
        calls.append(prompt)
        return '{"reasoning": "", "preference": "image_b"}'
    out = tmp_path / 'dab'
    kw = dict(base=t2i_dir('zimage'), lora=lora, judge_fn=judge, steps=2, size=32, seed=5, device='cpu',
              dtype=torch.float32)
    res = ev.run_densealign(rows, str(out), vlm=vlm_dir('qwen3'), **kw)
    assert len(calls) == 3 and res['n'] == 3 and res['images_generated'] == {'base': 3, 'trained': 3}
    names = sorted(os.listdir(out / 'images' / 'base'))
    assert names == sorted(os.listdir(out / 'images' / 'trained')) == ['a_1.png', 'b.png', 'c.png']
    mtimes = {p: os.path.getmtime(p) for p in (out / 'images').rglob('*.png')}
    # image of row i = seed + i, baseline without and trained with the LoRA (independent generation here)
    base = sample.load_model(t2i_dir('zimage'))
    want, _ = sample.generate(base, ['a blue cat'], [5 + 1], 2, 4.0, 32, 32)
    assert np.abs(_png(out / 'images' / 'base' / 'b.png') - sample.to_uint8(want)[0]).max() <= 1
    sample.load_lora(base, lora)
    want_t, _ = sample.generate(base, ['a blue cat'], [5 + 1], 2, 4.0, 32, 32)
    assert np.abs(_png(out / 'images' / 'trained' / 'b.png') - sample.to_uint8(want_t)[0]).max() <= 1
    assert np.abs(sample.to_uint8(want_t)[0].astype(int) - sample.to_uint8(want)[0]).max() > 10
    # image_b preferred: the trained image wins exactly in the unswapped items
    rng = random.Random(5)
    swaps = [rng.random() < 0.5 for _ in rows]
    assert res['win'] == swaps.count(False) and res['loss'] == swaps.count(True)
    # the reward means: the same numbers as scoring the PNGs directly (label where given, else the prompt)
    vm, vp = reward.load_vlm(vlm_dir('qwen3'))
    for side in ('base', 'trained'):
        ims = [Image.open(out / 'images' / side / n) for n in ('a_1.png', 'b.png', 'c.png')]
        r = reward.promptecho_reward(vm, vp, ims, ['a red dog', 'a blue cat', 'a green dog'])
        assert abs(res[f'reward_{side}'] - r.mean().item()) < 1e-5
    # second run: no judge call, no image written, the same summary (from the files)
    res2 = ev.run_densealign(rows, str(out), vlm=vlm_dir('qwen3'), **kw)
    assert len(calls) == 3 and res2['images_generated'] == {'base': 0, 'trained': 0}
    assert {p: os.path.getmtime(p) for p in (out / 'images').rglob('*.png')} == mtimes
    assert res2['win'] == res['win'] and len(open(out / 'judgements.jsonl').readlines()) == 3
    assert _strict_json(out / 'summary.json')['win'] == res['win']
    # more items later: only the new one is generated and judged
    res3 = ev.run_densealign(rows + [{'id': 'd', 'prompt': 'a cat'}], str(out), **kw)
    assert len(calls) == 4 and res3['n'] == 4 and res3['images_generated'] == {'base': 1, 'trained': 1}
    with pytest.raises(ValueError, match='other settings'):               # never mix runs in one folder
        ev.run_densealign(rows, str(out), **(kw | {'steps': 3}))
    with pytest.raises(ValueError, match="holds id 'b' with prompt 'a blue cat'"):   # nor prompt sets
        ev.run_densealign([rows[0], {'id': 'b', 'prompt': 'two violins'}], str(out), **kw)
    # the rewards of another VLM are computed, not read from the first VLM's records
    other = tmp_path / 'vlm2'
    shutil.copytree(vlm_dir('qwen3'), other)
    vm2, _ = reward.load_vlm(str(other))
    with torch.no_grad():
        for p in vm2.parameters():
            p.mul_(1.5)
    vm2.save_pretrained(other)
    vm2, vp2 = reward.load_vlm(str(other))
    res4 = ev.run_densealign(rows, str(out), vlm=str(other), **kw)
    ims = [Image.open(out / 'images' / 'base' / n) for n in ('a_1.png', 'b.png', 'c.png')]
    r2 = reward.promptecho_reward(vm2, vp2, ims, ['a red dog', 'a blue cat', 'a green dog']).mean().item()
    assert abs(res4['reward_base'] - r2) < 1e-5 and abs(r2 - res['reward_base']) > 1e-3
    with pytest.raises(ValueError, match='nothing to compare'):
        ev.run_densealign(rows, str(tmp_path / 'x'), **(kw | {'lora': ''}))
    print(ev.format_table(res))


def test_judgements_file_cut_by_a_kill_is_repaired(tmp_path):
    ev.judge_pairs(_rows(2), lambda i: _img(0), lambda i: _img(9), lambda *a: 'tie', str(tmp_path))
    path = tmp_path / 'judgements.jsonl'
    with open(path, 'a') as f:
        f.write('{"id": "2", "swa')                                       # killed mid-write
    calls = []
    recs = ev.judge_pairs(_rows(3), lambda i: _img(0), lambda i: _img(9),
                          lambda *a: calls.append(1) or 'image_a', str(tmp_path))
    assert len(calls) == 1 and [r['id'] for r in recs] == ['0', '1', '2']
    assert [json.loads(l)['id'] for l in open(path)] == ['0', '1', '2']


# -----------------------------------------------------------------------------
# eval.py: benchmark layouts

def _geneval_check(m, lines, out, n):
    src = out.parent / (out.name + '.jsonl')
    src.write_text('\n'.join(lines) + '\n')
    ev.export_geneval(m, str(src), str(out), n=n, steps=2, size=32)
    assert sorted(os.listdir(out)) == [f'{i:05d}' for i in range(len(lines))]
    for i, line in enumerate(lines):
        d = out / f'{i:05d}'
        assert (d / 'metadata.jsonl').read_bytes() == (line + '\n').encode()   # verbatim
        assert sorted(os.listdir(d / 'samples')) == [f'{k:04d}.png' for k in range(n)]
        assert Image.open(d / 'samples' / '0000.png').size == (32, 32)
        assert Image.open(d / 'grid.png').size == (32 * min(n, 4), 32 * math.ceil(n / 4))


def test_export_geneval_layout_and_resume(t2i_dir, tmp_path):
    m = sample.load_model(t2i_dir('zimage'))
    lines = [json.dumps({'tag': 'single_object', 'include': [{'class': c, 'count': 1}], 'prompt': f'a photo of a {c}'})
             for c in ('cat', 'dog')] + ['{"tag": "colors", "prompt": "a photo of a red cup",  "x": 1}']  # odd spacing
    _geneval_check(m, lines, tmp_path / 'g', n=4)
    # sample k of every prompt uses seed + k
    want, _ = sample.generate(m, ['a photo of a dog'], [1], 2, 4.0, 32, 32)
    assert np.abs(_png(tmp_path / 'g' / '00001' / 'samples' / '0001.png') - sample.to_uint8(want)[0]).max() <= 1
    mtimes = {p: os.path.getmtime(p) for p in (tmp_path / 'g').rglob('*')}
    loads = []
    ev.export_geneval(lambda: loads.append(1) or m, str(tmp_path / 'g.jsonl'), str(tmp_path / 'g'), n=4, steps=2, size=32)
    assert loads == [] and {p: os.path.getmtime(p) for p in (tmp_path / 'g').rglob('*')} == mtimes
    # a re-export with a smaller n leaves only n samples (GenEval scores every <k>.png) and a matching grid;
    # a temp file left by a killed run is removed, and a new one never matches GenEval's sample regex
    (tmp_path / 'g' / '00000' / 'samples' / '.0000.png.tmp').write_bytes(b'cut')
    ev.export_geneval(m, str(tmp_path / 'g.jsonl'), str(tmp_path / 'g'), n=2, steps=2, size=32)
    _geneval_check(m, lines, tmp_path / 'g', n=2)
    with pytest.raises(ValueError, match='g2.jsonl:2'):
        (tmp_path / 'g2.jsonl').write_text(lines[0] + '\nnot json\n')
        ev.export_geneval(m, str(tmp_path / 'g2.jsonl'), str(tmp_path / 'g2'), n=1, steps=2, size=32)


def test_export_geneval_official_metadata(t2i_dir, tmp_path):
    src = os.path.join(SHARED, 'geneval_evaluation_metadata.jsonl')
    if not os.path.isfile(src):
        pytest.skip("../shared/data/geneval_evaluation_metadata.jsonl not present")
    lines = open(src, encoding='utf-8').read().splitlines()[:3]
    _geneval_check(sample.load_model(t2i_dir('zimage')), lines, tmp_path / 'g', n=2)


def test_export_dpg_and_tiif_layouts(t2i_dir, tmp_path):
    m = sample.load_model(t2i_dir('zimage'))
    folder = tmp_path / 'dpg_prompts'
    folder.mkdir()
    (folder / 'partiprompts7.txt').write_text('a red dog on a blue sofa\n')
    (folder / 'coco12.txt').write_text('two cats\n')
    (folder / 'notes.md').write_text('ignored')
    rows = ev.read_dpg(str(folder))
    assert rows == [{'id': 'coco12', 'prompt': 'two cats'}, {'id': 'partiprompts7', 'prompt': 'a red dog on a blue sofa'}]
    ev.export_dpg(m, rows, str(tmp_path / 'd'), steps=2, size=32, seed=3)
    assert sorted(os.listdir(tmp_path / 'd')) == ['coco12.png', 'partiprompts7.png']
    g = _png(tmp_path / 'd' / 'coco12.png')
    assert g.shape == (64, 64, 3)                                         # 2x2 grid of 32px samples
    want, _ = sample.generate(m, ['two cats'] * 4, [3, 4, 5, 6], 2, 4.0, 32, 32)
    w = sample.to_uint8(want).astype(int)
    quads = [g[:32, :32], g[:32, 32:], g[32:, :32], g[32:, 32:]]         # row-major: seeds 3, 4, 5, 6
    assert all(np.abs(q - w[k]).max() <= 1 for k, q in enumerate(quads))
    jl = tmp_path / 'dpg.jsonl'
    jl.write_text(json.dumps({'id': 'x9', 'prompt': 'a cup'}) + '\n')
    ev.export_dpg(m, ev.read_dpg(str(jl)), str(tmp_path / 'd2'), steps=2, size=32)
    assert os.listdir(tmp_path / 'd2') == ['x9.png'] and Image.open(tmp_path / 'd2' / 'x9.png').size == (64, 64)
    for name, text in (('noid.jsonl', json.dumps({'prompt': 'a cup'})), ('p.txt', 'a cup')):   # line numbers are
        (tmp_path / name).write_text(text + '\n')                                           # no DPG item ids
        with pytest.raises(ValueError, match="DPG-Bench needs each prompt's item id"):
            ev.read_dpg(str(tmp_path / name))
    # TIIF: index within each type, both descriptions, a model-name level
    tiif = tmp_path / 't.jsonl'
    tiif.write_text('\n'.join(json.dumps({'type': t, 'short_description': f'{t} short {k}',
                                          'long_description': f'{t} long {k}'})
                              for t, k in (('color', 0), ('action+2d', 0), ('color', 1))) + '\n')
    assert ev.export_tiif(m, str(tiif), str(tmp_path / 'ti'), 'ours', steps=2, size=32) == {'color': 2, 'action+2d': 1}
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / 'ti') for d, _, fs in os.walk(tmp_path / 'ti') for f in fs)
    assert files == sorted(f'{t}/ours/{k}_description/{i}.png' for t, i in (('color', 0), ('color', 1), ('action+2d', 0))
                           for k in ('short', 'long'))                 # the type verbatim: TIIF joins it as is
    want, _ = sample.generate(m, ['color long 1'], [1], 2, 4.0, 32, 32)      # second color row: i = 1, seed + 1
    assert np.abs(_png(tmp_path / 'ti' / 'color' / 'ours' / 'long_description' / '1.png')
                  - sample.to_uint8(want)[0]).max() <= 1


# -----------------------------------------------------------------------------
# data_prep.py

def _image_folder(root):
    (root / 'sub').mkdir(parents=True)
    Image.new('RGB', (40, 40), (10, 200, 30)).save(root / 'a.png')
    Image.new('RGB', (48, 40), (200, 20, 30)).save(root / 'sub' / 'b.JPG')
    (root / 'broken.webp').write_bytes(b'not an image')
    (root / 'notes.txt').write_text('not an image either')


def test_caption_real_vlm_corrupt_and_resume(vlm_dir, tmp_path):
    root = tmp_path / 'imgs'
    _image_folder(root)
    assert data_prep.list_images(str(root)) == ['a.png', 'broken.webp', 'sub/b.JPG']
    model, proc = reward.load_vlm(vlm_dir('qwen3'))
    raw = str(tmp_path / 'cap.jsonl')
    fn = lambda ims: data_prep.vlm_captions(model, proc, ims, max_new_tokens=6)
    data_prep.caption_folder(str(root), raw, fn, batch=2)
    rows = [json.loads(l) for l in open(raw)]
    assert sorted(r['image'] for r in rows if 'caption' in r) == ['a.png', 'sub/b.JPG']
    assert [r['image'] for r in rows if 'error' in r] == ['broken.webp'] and len(rows) == 3
    assert all(isinstance(r['caption'], str) for r in rows if 'caption' in r)
    # greedy: the caption is what the VLM generates for that image on its own
    assert data_prep.vlm_captions(model, proc, [Image.open(root / 'a.png').convert('RGB')], max_new_tokens=6)[0] == \
        next(r['caption'] for r in rows if r['image'] == 'a.png')
    calls = []
    assert data_prep.caption_folder(str(root), raw, lambda ims: calls.append(ims) or [], 2) == []
    assert calls == [] and len(open(raw).readlines()) == 3                # resume: nothing captioned again
    s = data_prep.filter_split(raw, str(tmp_path / 'cap'), min_words=0, max_words=10 ** 6, test_size=1)
    assert s['unreadable'] == ['broken.webp'] and s['kept'] + s['dropped']['duplicate'] == 2


def test_caption_an_image_the_vlm_refuses_is_listed(tmp_path):
    root = tmp_path / 'imgs'
    _image_folder(root)
    raw = tmp_path / 'cap.jsonl'

    def fn(ims):                                                          # a processor that refuses one aspect ratio
        if any(im.size == (48, 40) for im in ims):
            raise ValueError('absolute aspect ratio must be smaller than 200')
        return ['ok'] * len(ims)
    data_prep.caption_folder(str(root), str(raw), fn, 8)
    rows = {r['image']: r for r in map(json.loads, open(raw))}
    assert rows['a.png']['caption'] == 'ok' and 'aspect ratio' in rows['sub/b.JPG']['error'] and len(rows) == 3
    def broken(ims):                                                      # a VLM that fails on every image
        raise RuntimeError('CUDA out of memory')
    n = len(open(raw).readlines())
    (root / 'c.png').write_bytes((root / 'a.png').read_bytes())
    (root / 'd.png').write_bytes((root / 'a.png').read_bytes())
    for batch in (8, 1):                                                  # stops, records nothing: a rerun resumes
        with pytest.raises(RuntimeError, match='out of memory'):
            data_prep.caption_folder(str(root), str(raw), broken, batch)
        assert len(open(raw).readlines()) == n
    raw.write_text(json.dumps({'prompt': 'a prompt file, not captions'}) + '\n' + json.dumps({'prompt': 'no newline'}))
    with pytest.raises(ValueError, match=r"cap.jsonl:1: not a captions row"):
        data_prep.caption_folder(str(root), str(raw), fn, 8)
    assert raw.read_text().splitlines()[1] == json.dumps({'prompt': 'no newline'})   # a whole last line is kept
    raw.write_text(json.dumps({'image': 'a.png', 'caption': 'x'}) + '\nnot json\n' + json.dumps({'image': 'c'}) + '\n')
    with pytest.raises(ValueError, match=r"cap.jsonl:2: not a JSON line"):
        data_prep.caption_folder(str(root), str(raw), fn, 8)


def test_caption_resume_after_a_kill(tmp_path):
    root = tmp_path / 'imgs'
    _image_folder(root)
    raw = tmp_path / 'cap.jsonl'
    raw.write_text(json.dumps({'image': 'a.png', 'caption': 'x'}) + '\n{"image": "broken.webp", "err')  # killed
    seen = []
    data_prep.caption_folder(str(root), str(raw), lambda ims: [seen.append(im.size) or 'y' for im in ims], 8)
    assert seen == [(48, 40)]                                             # only b; a was done, broken is recorded
    rows = [json.loads(l) for l in open(raw)]
    assert [r['image'] for r in rows] == ['a.png', 'broken.webp', 'sub/b.JPG'] and 'error' in rows[1]


def test_filter_split_reasons_and_hash_split(tmp_path):
    caps = {'short.png': 'word ' * 5, 'long.png': 'word ' * 20, 'd1.png': 'a cat on a red mat, seen from above',
            'd2.png': '  a cat on a red mat, seen from above\n', 'k1.png': 'one two three four five six seven',
            'k2.png': 'a dog with a blue ball in grass', 'k3.png': 'eight words for the third kept caption here',
            'sub/k4.png': 'the fourth kept caption has eight words'}
    rows = [{'image': i, 'caption': c} for i, c in caps.items()] + [{'image': 'bad.png', 'error': 'OSError: x'}]
    for order, name in ((rows, 'a'), (rows[::-1], 'b')):                  # input order must not matter
        raw = tmp_path / f'{name}.jsonl'
        raw.write_text(''.join(json.dumps(r) + '\n' for r in order))
        s = data_prep.filter_split(str(raw), str(tmp_path / name), min_words=6, max_words=10, test_size=2)
        assert s['dropped'] == {'unreadable': 1, 'too_short': 1, 'too_long': 1, 'duplicate': 1}
        assert (s['kept'], s['train'], s['test'], s['images']) == (5, 3, 2, 9) and s['unreadable'] == ['bad.png']
        assert sum(s['words_histogram'].values()) == 8
        assert _strict_json(tmp_path / f'{name}_summary.json') == s
    h = lambda p: hashlib.sha1(p.encode()).hexdigest()                   # the rule, computed here
    by_hash = sorted([min('d1.png', 'd2.png', key=h), 'k1.png', 'k2.png', 'k3.png', 'sub/k4.png'], key=h)
    for name in ('a', 'b'):
        test = [json.loads(l) for l in open(tmp_path / f'{name}_test.jsonl')]
        train = [json.loads(l) for l in open(tmp_path / f'{name}_train.jsonl')]
        assert [r['image'] for r in test] == by_hash[:2] and [r['image'] for r in train] == by_hash[2:]
    row = next(r for r in test + train if r['image'] == 'sub/k4.png')
    assert row == {'prompt': 'the fourth kept caption has eight words', 'id': 'sub_k4.png', 'image': 'sub/k4.png'}
    assert sample.read_prompts(str(tmp_path / 'a_train.jsonl'))[0]['id'] == train[0]['id']   # readable by sample.py
    print(data_prep.format_summary(s))


def test_split_of_a_growing_corpus_never_moves_train_to_test(tmp_path):
    caps = lambda n: [{'image': f'{i}.png', 'caption': f'caption number {i} of the corpus'} for i in range(n)]
    split = {}
    for n in (40, 400):                                                   # v1, then the corpus grows tenfold
        (tmp_path / f'{n}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in caps(n)))
        data_prep.filter_split(str(tmp_path / f'{n}.jsonl'), str(tmp_path / f'v{n}'), 1, 100, test_size=10)
        split[n] = [{r['image'] for r in map(json.loads, open(tmp_path / f'v{n}_{part}.jsonl'))} for part in ('train', 'test')]
    assert len(split[400][1]) == 10 and not split[40][0] & split[400][1]


def test_import_formats_and_ocr(tmp_path):
    (tmp_path / 'p.txt').write_text('a red dog\n\na blue cat\n')
    assert data_prep.import_prompts(str(tmp_path / 'p.txt')) == [{'prompt': 'a red dog', 'id': '0'},
                                                                  {'prompt': 'a blue cat', 'id': '1'}]
    (tmp_path / 'p.jsonl').write_text(json.dumps({'caption': 'a long caption', 'source': 'x'}) + '\n')
    assert data_prep.import_prompts(str(tmp_path / 'p.jsonl')) == [{'source': 'x', 'prompt': 'a long caption', 'id': '0'}]
    (tmp_path / 'g.jsonl').write_text(json.dumps({'tag': 'colors', 'include': [], 'prompt': 'a red cup'}) + '\n')
    assert data_prep.import_prompts(str(tmp_path / 'g.jsonl'))[0] == {'tag': 'colors', 'include': [], 'prompt': 'a red cup',
                                                                      'id': '0'}
    (tmp_path / 'p.csv').write_text('id,caption\nx1,"a cat, sitting"\nx2,a dog\n')
    assert data_prep.import_prompts(str(tmp_path / 'p.csv')) == [{'id': 'x1', 'prompt': 'a cat, sitting'},
                                                                  {'id': 'x2', 'prompt': 'a dog'}]
    (tmp_path / 'o.txt').write_text('A poster titled "SUMMER SALE" with the line \u201cup to 50% off\u201d, '
                                    '"shop now" and "free delivery"\nno quotes here\n')
    rows = data_prep.import_prompts(str(tmp_path / 'o.txt'), ocr=True)
    assert json.loads(rows[0]['label']) == {'main_title': ['SUMMER SALE'], 'subtitle': ['up to 50% off'],
                                            'selling_points': [], 'other_text': ['shop now', 'free delivery']}
    assert rows[0]['label'] == reward.ocr_label(json.loads(rows[0]['label']))          # canonical form
    assert rows[0]['query'] == reward.OCR_QUERY and json.loads(rows[1]['label'])['main_title'] == []
    for bad, msg in (('q.json', 'unknown prompt file type'), ('missing.txt', 'not found')):
        if bad.endswith('.json'):
            (tmp_path / bad).write_text('{}')
        with pytest.raises((ValueError, FileNotFoundError), match=msg):
            data_prep.import_prompts(str(tmp_path / bad))
    (tmp_path / 'n.jsonl').write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="row 0 has no"):
        data_prep.import_prompts(str(tmp_path / 'n.jsonl'))


def test_import_densealignbench_metadata(tmp_path):
    src = os.path.join(SHARED, 'densealignbench_metadata.jsonl')
    if not os.path.isfile(src):
        pytest.skip("../shared/data/densealignbench_metadata.jsonl not present")
    head = tmp_path / 'dab.jsonl'
    lines = open(src, encoding='utf-8').read().splitlines()[:3]
    head.write_text('\n'.join(lines) + '\n')
    rows = data_prep.import_prompts(str(head))
    assert [r['prompt'] for r in rows] == [json.loads(l)['caption'].strip() for l in lines]
    assert [r['id'] for r in rows] == ['0', '1', '2']


def test_cli_import_and_clear_errors(tmp_path):
    (tmp_path / 'p.txt').write_text('a red dog\n')
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=HERE, capture_output=True, text=True)
    r = run('data_prep.py', 'import', str(tmp_path / 'p.txt'), '--out', str(tmp_path / 'o' / 'p.jsonl'))
    assert r.returncode == 0 and sample.read_prompts(str(tmp_path / 'o' / 'p.jsonl')) == [{'prompt': 'a red dog', 'id': '0'}]
    r = run('data_prep.py', 'caption', str(tmp_path / 'nope'), '--vlm', 'x', '--out', str(tmp_path / 'c.jsonl'))
    assert r.returncode != 0 and 'image folder' in r.stderr and 'Traceback' not in r.stderr
    r = run('eval.py', 'densealign', '--prompts', str(tmp_path / 'p.txt'), '--base', str(tmp_path / 'nope'),
            '--lora', str(tmp_path / 'missing.safetensors'), '--judge', 'http://127.0.0.1:1/v1', '--judge_model', 'm',
            '--out', str(tmp_path / 'e'))
    assert r.returncode != 0 and 'LoRA file' in r.stderr and 'Traceback' not in r.stderr
    r = run('eval.py', 'export', '--bench', 'geneval', '--prompts', str(tmp_path / 'none.jsonl'), '--model', 'x',
            '--out', str(tmp_path / 'g'))
    assert r.returncode != 0 and 'not found' in r.stderr and 'Traceback' not in r.stderr
    (tmp_path / 'g.jsonl').write_text(json.dumps({'prompt': 'a cup'}) + '\n')
    for model in (str(tmp_path / 'nope'), 'ckpts/zimage'):              # a missing dir; an unreachable "hub id"
        r = subprocess.run([sys.executable, 'eval.py', 'export', '--bench', 'geneval', '--prompts', str(tmp_path / 'g.jsonl'),
                            '--model', model, '--out', str(tmp_path / 'g')], cwd=HERE, capture_output=True, text=True,
                           env=dict(os.environ, HF_HUB_OFFLINE='1'))
        assert r.returncode != 0 and f'model directory {model} not found' in r.stderr and 'Traceback' not in r.stderr
    r = run('eval.py', 'export', '--bench', 'geneval', '--prompts', str(tmp_path / 'g.jsonl'), '--model', 'x',
            '--lora', str(tmp_path / 'missing.safetensors'), '--out', str(tmp_path / 'd'))
    assert r.returncode != 0 and 'LoRA file' in r.stderr and 'Traceback' not in r.stderr
    r = run('eval.py', 'toy', '--lora', str(tmp_path / 'missing.safetensors'), '--toy_dir', str(tmp_path / 'nope'))
    assert r.returncode != 0 and 'LoRA file' in r.stderr and 'Traceback' not in r.stderr


def test_group_agreement_against_a_pair_loop():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(6, 5, generator=g)
    score = torch.randint(0, 3, (6, 5), generator=g).float() / 2   # ties in the score are common: no pair
    r[0, 1] = r[0, 2]                                              # a tie in the reward counts as disagreement
    score[0, 1], score[0, 2] = 1.0, 0.0
    agree = total = 0
    for n in range(6):                                             # every ordered pair within one prompt
        for i in range(5):
            for j in range(5):
                if score[n, i] > score[n, j]:
                    total += 1
                    agree += int(r[n, i] > r[n, j])
    rate, pairs = ev.group_agreement(r, score)
    assert pairs == total and abs(rate - agree / total) < 1e-7
    assert ev.group_agreement(r, score)[0] != ev.group_agreement(-r, score)[0]
    assert ev.group_agreement(score + 0.0, score)[0] == 1.0     # a reward equal to the score always agrees
    assert math.isnan(ev.group_agreement(r, torch.zeros(6, 5))[0])


def test_best_of_against_a_loop():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(7, 8, generator=g)
    ok = (torch.rand(7, 8, generator=g) < 0.3).float()
    res = ev.best_of(r, ok)
    assert sorted(res) == [1, 2, 4, 8] and sorted(ev.best_of(r[:, :6], ok[:, :6])) == [1, 2, 4, 6]
    for j, got in res.items():
        any_ok = sum(max(ok[n, :j].tolist()) for n in range(7)) / 7
        picked = sum(ok[n, max(range(j), key=lambda i: r[n, i].item())].item() for n in range(7)) / 7
        assert got == {'pass': pytest.approx(any_ok), 'reward_pick': pytest.approx(picked)}
    assert res[1]['pass'] == res[1]['reward_pick'] == pytest.approx(ok[:, 0].mean().item())
    for j, got in ev.best_of(ok, ok).items():        # a reward equal to the detector picks as well as any can
        assert got['reward_pick'] == got['pass']
    all_ok = sum(min(ok[n].tolist()) for n in range(7)) / 7
    assert ev.best_of(-ok, ok)[8]['reward_pick'] == pytest.approx(all_ok)   # its opposite picks a wrong one if any


def test_toy_metrics_on_known_images(tmp_path, monkeypatch):
    """eval.py toy's bookkeeping on images whose errors are known: the generator and the reward (its
    dependencies) are replaced by rendered scenes and chosen rewards; every figure is counted by hand."""
    import toy
    obj = lambda shape, color, cx, cy: dict(shape=shape, color=color, x=cx, y=cy, r=10.0)
    tl, tr, bl, br = (15.5, 15.5), (47.5, 15.5), (15.5, 47.5), (47.5, 47.5)  # the 2 x 2 layout's cells
    rc, bs = obj('circle', 'red', *tl), obj('square', 'blue', *tr)
    images = [toy.render([rc]),                                                   # "a red circle": ok
              np.full((64, 64, 3), 255, np.uint8),                                # blank
              toy.render([rc, bs]),                                               # "... and a blue square": ok
              toy.render([rc, bs, obj('circle', 'red', *bl), obj('square', 'blue', *br)]),  # extra: both rows,
              toy.render([obj('triangle', 'green', *tl), obj('square', 'green', *tr)]),      # 2 copies; attr
              toy.render([obj('triangle', 'green', *tl), obj('triangle', 'green', *tr)])]    # "two green ...": ok
    prompts = ['a red circle', 'a red circle and a blue square', 'two green triangles']
    f = tmp_path / 'p.jsonl'
    rows = [{'prompt': prompts[0]}, {'prompt': prompts[1], 'label': 'LABEL', 'query': 'QUERY'}, {'prompt': prompts[2]}]
    f.write_text(''.join(json.dumps(row) + '\n' for row in rows))
    r = torch.tensor([0.5, 0.1, 0.2, 0.9, 0.3, 0.4])
    asked, scored = [], []

    def generate(m, ps, seeds, *a):
        asked.append((ps, seeds))
        keep = [i for i in range(6) if prompts[i // 2] in ps]
        return torch.from_numpy(np.stack([images[i] for i in keep])).permute(0, 3, 1, 2).float() / 255, None
    monkeypatch.setattr(ev.sample, 'load_model', lambda *a, **k: 'policy')
    monkeypatch.setattr(ev.reward, 'load_vlm', lambda *a, **k: (None, None))
    monkeypatch.setattr(ev.sample, 'generate', generate)
    monkeypatch.setattr(ev.reward, 'promptecho_reward', lambda vm, vp, imgs, ls, qs, **k: scored.append((ls, qs)) or r[:len(ls)])
    res = ev.toy_metrics('m', 'v', str(f), n=3, k=2, seed=7, query='Q0')
    assert asked == [([p for p in prompts for _ in range(2)], list(range(7, 13)))]   # k images per prompt
    # the reward reads a row's label and query where it has them (as train.py does), else the prompt and --query
    assert scored == [([prompts[0]] * 2 + ['LABEL'] * 2 + [prompts[2]] * 2, ['Q0'] * 2 + ['QUERY'] * 2 + ['Q0'] * 2)]
    assert res['errors'] == {'ok': 3, 'blank': 1, 'extra': 1, 'attr': 1} and res['accuracy'] == 0.5
    assert res['claims'] == pytest.approx((1 + 0 + 1 + 0 + 0.5 + 1) / 6)  # extra: 0 of 3 claims, attr: 1 of 2
    assert res['over_full'] == {'images': 1, 'both_rows': 1, 'copies': 2, 'recoloured': 0}
    assert res['reward'] == pytest.approx(r.mean().item())
    # pairs with different claims satisfied: (ok 0.5 > blank 0.1) agrees, (ok 0.2 < extra 0.9) does not,
    # (ok 0.4 > attr 0.3) agrees; the all-correct vs wrong pairs are the same three
    assert (res['agreement'], res['pairs']) == (pytest.approx(2 / 3), 3)
    assert (res['agreement_correct'], res['pairs_correct']) == (pytest.approx(2 / 3), 3)
    # best of 1: the first images (ok, ok, attr); of 2: every prompt has an all-correct image, and the
    # reward picks ok (0.5), extra (0.9), ok (0.4)
    assert res['best_of'] == {1: {'pass': pytest.approx(2 / 3), 'reward_pick': pytest.approx(2 / 3)},
                              2: {'pass': 1.0, 'reward_pick': pytest.approx(2 / 3)}}
    res = ev.toy_metrics('m', 'v', str(f), n=3, k=2, keep=lambda p: 'two' not in p)   # a filter: 2 prompts
    assert res['errors'] == {'ok': 2, 'blank': 1, 'extra': 1}
    assert res['best_of'][2] == {'pass': 1.0, 'reward_pick': 0.5}
    with pytest.raises(ValueError, match='left to evaluate'):              # a filter that keeps nothing
        ev.toy_metrics('m', 'v', str(f), keep=lambda p: False)
