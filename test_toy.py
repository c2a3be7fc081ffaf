"""
Tests of the toy world. Facts are checked against the scene that was rendered (or against
hand-written expectations), never against another output of the code under test.
Run: python -m pytest -q test_toy.py
"""
from collections import Counter, deque

import numpy as np
import pytest

import toy

N_SCENES = 300
AREA = {'circle': np.pi, 'square': 2.0, 'triangle': 3 * np.sqrt(3) / 4}  # area / r^2 of each shape

# -----------------------------------------------------------------------------
# independent ground truth

def holds(a, b, rel):
    """The relation rule, written out again: a is left of b when b is in the 90-degree cone right of a."""
    dx, dy = b['x'] - a['x'], b['y'] - a['y']
    return {'left': dx > abs(dy), 'right': -dx > abs(dy), 'above': dy > abs(dx), 'below': -dy > abs(dx)}[rel]

def true_of_scene(claims, scene):
    """Is every claim true of the scene, and does the caption mention every object?"""
    counts = Counter((o['color'], o['shape']) for o in scene)
    mentioned = {(c[1], c[2]): c[3] for c in claims if c[0] == 'count'}
    if mentioned != dict(counts) or ('total', len(scene)) not in claims:
        return False
    for c in claims:
        if c[0] == 'rel':
            (a,), (b,) = ([o for o in scene if (o['color'], o['shape']) == g] for g in (c[1], c[3]))
            if not holds(a, b, c[2]):
                return False
    return True

def count_claims(counts):
    """{(color, shape): n} -> the count and total claims, in the documented order."""
    counts = {k: v for k, v in counts.items() if v > 0}
    return [('count', c, s, counts[c, s]) for c in toy.COLORS for s in toy.SHAPES if (c, s) in counts] + [
        ('total', sum(counts.values()))]

def artefacts(image, rng):
    """What a generator gets wrong: 3x3 box blur, a colour shift of +-20 per channel, noise std 15."""
    img = image.astype(np.float64)
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode='edge')
    img = sum(p[i:i + img.shape[0], j:j + img.shape[1]] for i in range(3) for j in range(3)) / 9
    img = img + rng.uniform(-20, 20, size=3) + rng.normal(0, 15, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)

@pytest.fixture(scope='module')
def data():
    """N_SCENES (scene, image, claims, caption) tuples."""
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(N_SCENES):
        # the renderer's full range: 1-4 objects in a 2 x 2 layout (the world itself draws 1-MAX_OBJECTS)
        scene = toy.random_scene(rng, n_objects=int(rng.integers(1, 5)), layout=(2, 2))
        claims = toy.scene_claims(scene, rng)
        out.append((scene, toy.render(scene), claims, toy.verbalize(claims, rng)))
    return out

# -----------------------------------------------------------------------------
# scenes and rendering

def test_scene_geometry(data):
    sizes = Counter(len(scene) for scene, *_ in data)
    assert set(sizes) == {1, 2, 3, 4}
    rng = np.random.default_rng(0)   # the world's own scenes: 1..MAX_OBJECTS objects
    assert {len(toy.random_scene(rng)) for _ in range(200)} == set(range(1, toy.MAX_OBJECTS + 1))
    for scene, *_ in data:
        for i, o in enumerate(scene):
            assert o['shape'] in toy.SHAPES and o['color'] in toy.COLORS
            assert toy.R_MIN <= o['r'] <= toy.R_MAX
            assert o['r'] + toy.EDGE <= min(o['x'], o['y']) and max(o['x'], o['y']) <= 63 - o['r'] - toy.EDGE
            for p in scene[:i]:  # circumcircles at least 3 px apart: objects never touch
                assert np.hypot(o['x'] - p['x'], o['y'] - p['y']) >= o['r'] + p['r'] + toy.GAP
    assert len(toy.random_scene(np.random.default_rng(0), n_objects=4, layout=(2, 2))) == 4
    with pytest.raises(AssertionError):                          # one object per cell: a 1 x 2 layout holds 2
        toy.random_scene(np.random.default_rng(0), n_objects=3, layout=(1, 2))


def test_scene_layout_one_object_per_cell(data):
    rng = np.random.default_rng(5)
    row = [toy.random_scene(rng, layout=(1, 2)) for _ in range(200)]  # LAYOUT = (1, 2): side by side
    for (rows, cols), scenes in (((2, 2), [d[0] for d in data]), ((1, 2), row)):
        w, h, used = 64 / cols, 64 / rows, set()
        for scene in scenes:
            cells = [(int((o['x'] + 0.5) // w), int((o['y'] + 0.5) // h)) for o in scene]
            assert len(set(cells)) == len(scene)                 # never two objects in one cell
            for o, (i, j) in zip(scene, cells):                  # within JITTER of the cell's centre
                assert max(abs(o['x'] - ((i + 0.5) * w - 0.5)), abs(o['y'] - ((j + 0.5) * h - 0.5))) <= toy.JITTER
            used |= set(cells)
        assert len(used) == rows * cols                           # every cell is used

def test_render_area_colour_and_extent():
    rng = np.random.default_rng(0)
    for shape in toy.SHAPES:
        for color, rgb in toy.COLORS.items():
            o = dict(shape=shape, color=color, x=rng.uniform(20, 44), y=rng.uniform(20, 44), r=rng.uniform(7, 11))
            img = toy.render([o])
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            assert (img[0, 0] == 255).all() and (img[int(round(o['y'])), int(round(o['x']))] == rgb).all()
            ch = int(np.argmax(255 - np.array(rgb)))  # the channel that darkens most
            alpha = (255.0 - img[..., ch]) / (255 - rgb[ch])  # coverage of each pixel
            assert abs(alpha.sum() - AREA[shape] * o['r'] ** 2) < 0.02 * AREA[shape] * o['r'] ** 2
            # the centroid is (x, y), up to the 1/4 px sub-pixel sampling
            assert abs((alpha * np.arange(64)).sum() / alpha.sum() - o['x']) < 0.15
            assert abs((alpha * np.arange(64)[:, None]).sum() / alpha.sum() - o['y']) < 0.15
            half_w = {'circle': o['r'], 'square': o['r'] / np.sqrt(2), 'triangle': o['r'] * np.sqrt(3) / 2}[shape]
            cols = np.nonzero(alpha.sum(0) > 0)[0]
            assert abs(cols.min() - (o['x'] - half_w)) < 1 and abs(cols.max() - (o['x'] + half_w)) < 1

# -----------------------------------------------------------------------------
# captions

def test_captions_true_of_their_scene(data):
    assert all(true_of_scene(claims, scene) for scene, _, claims, _ in data)
    assert sum(any(c[0] == 'rel' for c in claims) for _, _, claims, _ in data) > N_SCENES // 5

def test_captions_parse_back(data):
    rng = np.random.default_rng(5)
    texts = set()
    for _, _, claims, text in data:
        for t in [text] + [toy.verbalize(claims, rng) for _ in range(5)]:  # more phrasings
            assert toy.parse_caption(t) == claims, t
            words = toy.tokenize(t)
            assert set(words) <= set(toy.VOCAB) and sum(w.isalpha() for w in words) <= toy.MAX_WORDS
            texts.add(t)
    assert len(texts) > 4 * N_SCENES  # many phrasings
    for marker in (', with the', '. the', ': ', 'there is', 'an image showing', 'to the left of', 'under'):
        assert any(marker in t for t in texts), marker

def test_parse_handwritten():
    assert toy.parse_caption('two red circles and a blue square') == [
        ('count', 'red', 'circle', 2), ('count', 'blue', 'square', 1), ('total', 3)]
    assert toy.parse_caption('A green triangle to the left of a yellow circle.') == [
        ('count', 'green', 'triangle', 1), ('count', 'yellow', 'circle', 1), ('total', 2),
        ('rel', ('green', 'triangle'), 'left', ('yellow', 'circle'))]
    assert toy.parse_caption('there are four shapes: a red square, two blue circles, and one green triangle. '
                             'the green triangle is under the red square') == [
        ('count', 'red', 'square', 1), ('count', 'green', 'triangle', 1), ('count', 'blue', 'circle', 2),
        ('total', 4), ('rel', ('green', 'triangle'), 'below', ('red', 'square'))]
    for bad in ('a red circles', 'two red circle', 'a purple circle', 'the red circle', 'a red circle and',
                'a red circle left of two blue squares', 'a red circle and one red circle', ''):
        with pytest.raises(ValueError):
            toy.parse_caption(bad)

def test_vocab():
    assert toy.VOCAB == sorted(set(toy.VOCAB)) and all(w == w.lower() for w in toy.VOCAB)
    assert toy.tokenize('Describe this image in detail.') == list(toy.QUERY_WORDS)

# -----------------------------------------------------------------------------
# detection and scoring

def test_detect_exact_on_clean_renders(data):
    for scene, image, _, _ in data:
        found = toy.detect(image)
        assert len(found) == len(scene)
        for o in scene:  # objects are >= 17 px apart, so the nearest detection is the match
            d = min(found, key=lambda q: np.hypot(q['x'] - o['x'], q['y'] - o['y']))
            assert (d['shape'], d['color']) == (o['shape'], o['color'])
            assert np.hypot(d['x'] - o['x'], d['y'] - o['y']) < 1.5 and abs(d['r'] - o['r']) < 1.0

def test_score_exact_on_clean_renders(data):
    assert all(toy.score(image, text) == (1.0, True) for _, image, _, text in data)

def test_score_robust_to_artefacts(data):
    rng = np.random.default_rng(7)
    ok = [toy.score(artefacts(image, rng), text)[1] for _, image, _, text in data]
    assert np.mean(ok) >= 0.98

def test_wrong_captions_fail(data):
    rng = np.random.default_rng(3)
    flip = {'left': 'right', 'right': 'left', 'above': 'below', 'below': 'above'}
    n_rel = 0
    for scene, image, claims, _ in data[:100]:
        counts = Counter((o['color'], o['shape']) for o in scene)
        (color, shape), n = list(counts.items())[0]
        wrong = []
        # a count off by one (the total follows, so the caption is still self-consistent)
        wrong.append(count_claims(counts | {(color, shape): n + 1 if len(scene) < 4 else n - 1}))
        # a colour swapped for one this shape does not have
        free = [c for c in toy.COLORS if (c, shape) not in counts]
        if free:
            others = {k: v for k, v in counts.items() if k != (color, shape)}
            wrong.append(count_claims(others | {(free[0], shape): n}))
        # a relation flipped
        for c in claims:
            if c[0] == 'rel':
                wrong.append([d if d[0] != 'rel' else ('rel', d[1], flip[d[2]], d[3]) for d in claims])
                n_rel += 1
        for w in wrong:
            assert not true_of_scene(w, scene)  # the test's own premise
            frac, all_correct = toy.score(image, toy.verbalize(w, rng))
            assert not all_correct and frac < 1
    assert n_rel > 10

def test_score_handmade_scene():
    scene = [dict(shape='circle', color='red', x=16, y=32, r=9),
             dict(shape='square', color='blue', x=48, y=30, r=9)]
    image = toy.render(scene)
    assert toy.score(image, 'a red circle to the left of a blue square') == (1.0, True)
    text = 'a blue square and a red circle. the blue square is right of the red circle'
    assert toy.score(image, text) == (1.0, True)
    assert toy.score(image, 'a red circle to the right of a blue square') == (0.75, False)
    assert toy.score(image, 'a green circle and a blue square') == (2 / 3, False)
    assert toy.score(image, 'two red circles and a blue square') == (1 / 3, False)
    assert toy.score(image, 'a red circle') == (0.5, False)  # the blue square is not mentioned


def test_error_kind_handmade_scene():
    # the two-object scene above, judged against captions with a known defect each
    image = toy.render([dict(shape='circle', color='red', x=16, y=32, r=9),
                        dict(shape='square', color='blue', x=48, y=30, r=9)])
    assert toy.error_kind(image, 'a red circle to the left of a blue square') == 'ok'
    assert toy.error_kind(image, 'a red circle') == 'extra'
    assert toy.error_kind(image, 'two red circles and a blue square') == 'missing'
    assert toy.error_kind(image, 'a green circle and a blue square') == 'attr'
    assert toy.error_kind(image, 'a red circle to the right of a blue square') == 'attr'
    assert toy.error_kind(toy.render([]), 'a red circle') == 'blank'

def test_surplus_handmade_scenes():
    # the prompted pair in the top row, a copy of the red circle and a blue triangle in the bottom row
    obj = lambda shape, color, x, y: dict(shape=shape, color=color, x=x, y=y, r=8)
    four = toy.render([obj('circle', 'red', 16, 16), obj('square', 'blue', 48, 16),
                       obj('circle', 'red', 16, 48), obj('triangle', 'blue', 48, 48)])
    assert toy.surplus(four, 'a red circle to the left of a blue square') == (True, 1, 1)
    assert toy.surplus(four, 'two red circles and a blue square') == (True, 0, 1)
    assert toy.surplus(four, 'a green circle') == (True, 0, 0)
    top = toy.render([obj('circle', 'red', 16, 16), obj('circle', 'red', 48, 16), obj('square', 'red', 32, 48)])
    assert toy.surplus(top, 'a red circle') == (True, 1, 1)
    two = toy.render([obj('circle', 'red', 16, 16), obj('circle', 'red', 48, 16)])
    assert toy.surplus(two, 'a red circle') == (False, 1, 0)    # one row only
    assert toy.surplus(two, 'two red circles') is None           # not over-full


def test_detect_ignores_background_and_specks():
    rng = np.random.default_rng(0)
    white = np.full((64, 64, 3), 255, np.uint8)
    assert toy.detect(white) == []
    assert toy.detect(np.clip(white + rng.normal(0, 15, white.shape), 0, 255).astype(np.uint8)) == []
    speck = white.copy()
    speck[30:33, 30:33] = toy.COLORS['red']  # 9 px: below MIN_AREA
    assert toy.detect(speck) == []

def test_connected_components_against_bfs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(-1, 3, size=(23, 31))
        labels[rng.random(labels.shape) < 0.4] = -1
        comp = toy.connected_components(labels)
        seen = np.zeros(labels.shape, bool)
        ids = set()
        for i0, j0 in zip(*np.nonzero(labels >= 0)):
            if seen[i0, j0]:
                continue
            seen[i0, j0], queue, members = True, deque([(i0, j0)]), []
            while queue:  # plain BFS over the 8 neighbours with the same label
                i, j = queue.popleft()
                members.append((i, j))
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        a, b = i + di, j + dj
                        if 0 <= a < 23 and 0 <= b < 31 and not seen[a, b] and labels[a, b] == labels[i, j]:
                            seen[a, b] = True
                            queue.append((a, b))
            got = {comp[m] for m in members}
            assert len(got) == 1 and got.isdisjoint(ids)  # one id per component, never shared
            ids |= got
        assert (comp[labels < 0] == -1).all()

# -----------------------------------------------------------------------------
# data

def test_prompt_split():
    train, heldout = toy.prompt_split(400, 100, seed=0)
    assert len(train) == 400 and len(heldout) == 100
    assert len(set(train)) == 400 and len(set(heldout)) == 100 and not set(train) & set(heldout)
    meaning = lambda texts: {tuple(toy.parse_caption(t)) for t in texts}
    assert not meaning(train) & meaning(heldout)  # disjoint as meanings too
    assert toy.prompt_split(400, 100, seed=0) == (train, heldout)
    assert toy.prompt_split(400, 100, seed=1)[0] != train

def test_caption_scene_pairs_and_augment():
    pairs = toy.caption_scene_pairs(20, seed=0)
    assert [t for _, t in pairs] == [t for _, t in toy.caption_scene_pairs(20, seed=0)]
    assert not {t for _, t in toy.caption_scene_pairs(20, seed=0, exclude=[pairs[0][1]])} & {pairs[0][1]}
    rng = np.random.default_rng(0)
    ok = []
    for image, text in pairs:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert toy.score(image, text) == (1.0, True)
        aug = toy.augment(image, rng)
        assert aug.shape == image.shape and aug.dtype == np.uint8 and (aug != image).any()
        ok.append(toy.score(aug, text)[1])
    assert np.mean(ok) >= 0.95
    many = toy.caption_scene_pairs(40, seed=0, max_objects=4, layout=(2, 2))  # the 2 x 2 world's captioners: 1-4
    assert {next(c[1] for c in toy.parse_caption(t) if c[0] == 'total') for _, t in many} == {1, 2, 3, 4}
    assert all(toy.score(image, text) == (1.0, True) for image, text in many)


def test_pretraining_meanings_lose_a_meaning_only_when_every_phrasing_is_held_out(tmp_path):
    """eval.py toy --meanings: the policy's pretraining meanings, rebuilt from its recipe, lack a held-out
    meaning exactly when all its phrasings are held-out strings."""
    import json
    import os
    os.makedirs(tmp_path / 'zimage')
    (tmp_path / 'zimage' / 'toy_recipe.json').write_text(json.dumps(dict(n_pretrain=300, seed=1, max_objects=2)))
    one = toy.parse_caption('one yellow square')                 # [('count', 'yellow', 'square', 1), ('total', 1)]
    rng = np.random.default_rng(0)
    phrasings = sorted({toy.verbalize(one, rng) for _ in range(2000)})
    assert len(phrasings) > 10 and all(toy.parse_caption(p) == one for p in phrasings)
    def meanings(heldout):
        (tmp_path / 'heldout.jsonl').write_text(''.join(json.dumps({'prompt': p}) + '\n' for p in heldout))
        return toy.pretraining_meanings(str(tmp_path))
    assert tuple(one) in meanings([])                             # 300 scenes of 1-2 objects draw it
    assert tuple(one) in meanings(phrasings[:1])                  # other phrasings of it remain
    lost = meanings(phrasings)
    assert tuple(one) not in lost and len(lost) > 50
    with pytest.raises(FileNotFoundError, match='build the toy world'):
        toy.pretraining_meanings(str(tmp_path / 'nowhere'))


def test_prepare_rebuilds_only_what_its_recipe_changed(tmp_path):
    """prepare() skips a model built with the same recipe, rebuilds one whose recipe changed (a constant was
    edited) or is unknown (no toy_recipe.json), and leaves the others alone."""
    import json
    import os
    d = str(tmp_path / 'toy')
    stamp = lambda: {k: os.path.getmtime(os.path.join(d, k, 'toy_recipe.json')) for k in ('zimage', 'vlm', 'vlm_weak')}
    toy.prepare(d, steps=(1, 1, 2, 1), n_pretrain=8)
    first = stamp()
    assert json.load(open(os.path.join(d, 'vlm', 'toy_recipe.json')))['max_objects'] == toy.VLM_MAX_OBJECTS
    assert json.load(open(os.path.join(d, 'zimage', 'toy_recipe.json')))['max_objects'] == toy.MAX_OBJECTS
    toy.prepare(d, steps=(1, 1, 2, 1), n_pretrain=8)
    assert stamp() == first                                       # nothing rebuilt
    heldout = open(os.path.join(d, 'heldout.jsonl')).read()
    open(os.path.join(d, 'heldout.jsonl'), 'w').write('{"prompt": "one red circle above a blue square", "id": "0"}\n')
    toy.prepare(d, steps=(1, 1, 2, 1), n_pretrain=8)              # another world's prompts are rewritten
    assert open(os.path.join(d, 'heldout.jsonl')).read() == heldout and stamp() == first
    os.remove(os.path.join(d, 'vlm_weak', 'toy_recipe.json'))     # a build of an older toy.py
    toy.prepare(d, steps=(1, 1, 3, 1), n_pretrain=8)              # VLM_STEPS edited
    again = stamp()
    assert again['zimage'] == first['zimage']
    assert again['vlm'] != first['vlm'] and again['vlm_weak'] != first['vlm_weak']
    assert json.load(open(os.path.join(d, 'vlm', 'toy_recipe.json')))['steps'] == 3
    assert not [f for f in os.listdir(d) if f.endswith('.tmp')]


def test_toy_pipeline_smoke_through_train(tmp_path):
    """The toy world end to end through train.py: tiny pretraining, one RL iteration, held-out eval."""
    import json
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    cfg = tmp_path / 'toy_smoke.py'
    cfg.write_text(open(os.path.join(here, 'config', 'toy.py')).read().replace(
        "toy.prepare('out/toy', query=reward.QUERY)",
        f"toy.prepare({str(tmp_path / 'toy')!r}, query=reward.QUERY, steps=(2, 2, 2, 2), n_pretrain=64)"))
    out = tmp_path / 'run'
    p = subprocess.run([sys.executable, 'train.py', str(cfg), f'--out_dir={out}', '--max_iters=1', '--eval_n=4',
                        '--prompts_per_iter=2', '--images_per_prompt=4', '--batch_size=8', '--micro_batch=4',
                        '--rollout_steps=2', '--sample_every=1'], cwd=here, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.load(open(out / 'eval_summary.json'))
    assert 0.0 <= summary['base']['eval_metric'] <= 1.0 and set(summary['trained']) == set(summary['base'])
    assert (out / 'ckpt' / 'lora.safetensors').is_file() and (out / 'curves.png').is_file()
    heldout = {json.loads(l)['prompt'] for l in open(tmp_path / 'toy' / 'heldout.jsonl')}
    train = {json.loads(l)['prompt'] for l in open(tmp_path / 'toy' / 'train.jsonl')}
    assert not heldout & train                                    # held-out prompts never used in RL
