"""
The toy world (the shakespeare_char of promptecho): scenes of 1-2 coloured shapes on white (the renderer takes
up to 4), one per cell of a 2 x 2 layout (so the difficulty is composition: counts, colour-shape binding, relations),
small enough to run text-to-image RL on a laptop CPU. This part holds the SCENE side:
sampling, rendering, a caption grammar whose captions are TRUE of their scene, a parser,
a pixel-only detector and the scorer built on both.

Conventions
- pixel (row i, col j) has its centre at (x=j, y=i); y grows downwards.
- an object's r is its circumradius: the whole shape lies inside the circle (x, y, r).
- a caption enumerates ALL objects of its scene. Its claims (what parse_caption returns):
    ('count', color, shape, n)                  one per colour-shape group mentioned, n >= 1
    ('total', n)                                always; n = number of objects, so an extra object is an error
    ('rel', (color, shape), rel, (color, shape)) at most one; both groups are mentioned with n == 1
  in this order: counts sorted by (COLORS, SHAPES) order, total, rel.
- relation rule (relation_holds): a is left of b when b lies in the 90-degree cone to the right
  of a, i.e. (b.x - a.x) - |b.y - a.y| > 0; likewise right / above / below. Captions only state
  a relation when it holds with a margin of REL_SLACK px; the scorer checks it with margin 0.
"""
import re
from collections import Counter

import numpy as np

# -----------------------------------------------------------------------------
# the world
IMAGE_SIZE = 64                 # images are (IMAGE_SIZE, IMAGE_SIZE, 3) uint8
BACKGROUND = (255, 255, 255)    # white
COLORS = {'red': (220, 30, 30), 'green': (30, 170, 50), 'blue': (30, 60, 220), 'yellow': (240, 200, 20)}
SHAPES = ('circle', 'square', 'triangle')
LAYOUT = (2, 2)                 # objects sit in the cells of a rows x cols layout (one per cell) ... (1, 2): side by
                                # side, a world of binding and left/right errors (TOY.md, "A 1 x 2 world")
JITTER = 2.0                    # ... at the cell centre +- JITTER px: composition, not placement, is the task
R_MIN, R_MAX = 9.0, 11.5        # circumradius range, px (fits a 32 px cell with the jitter and EDGE)
MAX_OBJECTS = 2                 # objects per random scene: 1..MAX_OBJECTS (the layout holds up to rows * cols)
CELLS = LAYOUT[0] * LAYOUT[1]
GAP = 3.0                       # min px between two objects' circumcircles: objects never touch
EDGE = 2.0                      # min px between a circumcircle and the border (room for +-2 px jitter)
assert (IMAGE_SIZE / max(LAYOUT) / 2 - 0.5 - JITTER - R_MAX >= EDGE and  # the layout keeps both margins
        IMAGE_SIZE / max(LAYOUT) - 2 * (JITTER + R_MAX) >= GAP and MAX_OBJECTS <= CELLS)
SUPERSAMPLE = 4                 # render at 4x4 samples per pixel, then box-average (anti-aliasing)
AREA_FACTOR = {'circle': np.pi, 'square': 2.0, 'triangle': 3 * np.sqrt(3) / 4}  # area = f * r^2
# detector
MIN_ALPHA = 0.5                 # a pixel is an object pixel when >= half-way from background to a colour
MAX_OFF_AXIS = 0.7              # ... and its colour is within atan(0.7) = 35 deg of that colour's
MIN_AREA = 20                   # smaller components (px at 64x64) are noise
# relations and caption grammar
RELATIONS = ('left', 'right', 'above', 'below')
REL_SLACK = 8.0                 # px margin a relation must hold by before a caption states it (= 4 JITTER and
                                # the test is strict: two diagonal cells never qualify, a row or column always does)
P_RELATION = 0.5                # chance a caption states a relation (when one is available)
P_TOTAL = 0.25                  # chance a caption says the total ("three shapes: ...")
MAX_WORDS = 20                  # captions have at most this many words (punctuation not counted)
NUMBER_WORDS = {1: ('a', 'one'), 2: ('two',), 3: ('three',), 4: ('four',)}
PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles'}
PREFIXES = ('', '', 'a picture of', 'an image showing', 'an image of', 'a drawing of', 'a photo of',
            'there are')    # ('' twice: half of the captions have no prefix; 'there is' when singular)
TOTAL_NOUNS = ('shapes', 'objects')
REL_PHRASES = {'left': ('to the left of', 'left of'), 'right': ('to the right of', 'right of'),
               'above': ('above',), 'below': ('below', 'under')}
QUERY_WORDS = ('describe', 'this', 'image', 'in', 'detail', '.')  # "Describe this image in detail."
_phrases = [*PREFIXES, 'there is', *(p for ps in REL_PHRASES.values() for p in ps)]
VOCAB = sorted({w for p in _phrases for w in p.split()} | {w for ws in NUMBER_WORDS.values() for w in ws}
               | set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(TOTAL_NOUNS)
               | {'and', 'with', 'the', 'is', ',', '.', ':'})  # every token a caption can hold

# -----------------------------------------------------------------------------
# scenes and rendering

def random_scene(rng, n_objects=None, max_objects=MAX_OBJECTS, layout=LAYOUT):
    """A list of n objects {'shape', 'color', 'x', 'y', 'r'} (default 1..max_objects), each in its own cell of
    the (rows, cols) layout."""
    n = int(rng.integers(1, max_objects + 1)) if n_objects is None else n_objects
    rows, cols = layout
    assert 1 <= n <= rows * cols, n
    w, h = IMAGE_SIZE / cols, IMAGE_SIZE / rows                   # cell size, px
    scene = []
    for k in rng.permutation(rows * cols)[:n]:
        cx, cy = (k % cols + 0.5) * w - 0.5, (k // cols + 0.5) * h - 0.5  # pixel centres: 15.5 / 47.5, 31.5
        x, y = np.array([cx, cy]) + rng.uniform(-JITTER, JITTER, size=2)
        shape, color = _pick(rng, SHAPES), _pick(rng, list(COLORS))
        scene.append(dict(shape=shape, color=color, x=float(x), y=float(y), r=float(rng.uniform(R_MIN, R_MAX))))
    return scene

def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]

def _coverage(shape, x, y, r, x0, y0, w, h, ss=SUPERSAMPLE):
    """Fraction of each pixel of the window rows y0..y0+h-1, cols x0..x0+w-1 inside the shape: (h, w)."""
    o = (np.arange(ss) + 0.5) / ss - 0.5                     # sub-pixel sample offsets
    X = ((x0 + np.arange(w))[:, None] + o).reshape(1, -1) - x  # (1, w*ss) relative to the centre
    Y = ((y0 + np.arange(h))[:, None] + o).reshape(-1, 1) - y  # (h*ss, 1)
    if shape == 'circle':
        inside = X ** 2 + Y ** 2 <= r ** 2
    elif shape == 'square':  # axis-aligned, half-side r / sqrt(2)
        inside = (np.abs(X) <= r / np.sqrt(2)) & (np.abs(Y) <= r / np.sqrt(2))
    else:  # equilateral triangle, apex up at (x, y - r), base at y + r/2; centroid = (x, y)
        inside = (Y <= r / 2) & (np.sqrt(3) * np.abs(X) <= Y + r)
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))    # (h*ss, w*ss) -> (h, w)

def render(scene, size=IMAGE_SIZE):
    """Rasterise a scene (coordinates in IMAGE_SIZE units) to a (size, size, 3) uint8 image."""
    s = size / IMAGE_SIZE
    img = np.full((size, size, 3), BACKGROUND, dtype=np.float64)
    for o in scene:
        x, y = (o['x'] + 0.5) * s - 0.5, (o['y'] + 0.5) * s - 0.5  # pixel centres scale about the corner
        cov = _coverage(o['shape'], x, y, o['r'] * s, 0, 0, size, size)[..., None]  # (H, W, 1)
        img = img * (1 - cov) + np.array(COLORS[o['color']], float) * cov
    return np.round(img).astype(np.uint8)

def relation_holds(a, b, rel, slack=0.0):
    """Is object a `rel` object b? e.g. left: b is in the 90-degree cone right of a, by > slack px."""
    dx, dy = b['x'] - a['x'], b['y'] - a['y']
    along, across = {'left': (dx, dy), 'right': (-dx, dy), 'above': (dy, dx), 'below': (-dy, dx)}[rel]
    return along - abs(across) > slack

# -----------------------------------------------------------------------------
# captions: scene -> claims -> text -> claims

def scene_claims(scene, rng):
    """The claims a caption of this scene makes (all true): counts, total, maybe one relation."""
    counts = Counter((o['color'], o['shape']) for o in scene)
    claims = [('count', c, s, counts[c, s]) for c in COLORS for s in SHAPES if counts[c, s]]
    claims.append(('total', len(scene)))
    singles = [o for o in scene if counts[o['color'], o['shape']] == 1]  # relations need unique referents
    options = [(a, rel, b) for a in singles for b in singles if a is not b
               for rel in RELATIONS if relation_holds(a, b, rel, REL_SLACK)]
    if options and rng.random() < P_RELATION:
        a, rel, b = _pick(rng, options)
        claims.append(('rel', (a['color'], a['shape']), rel, (b['color'], b['shape'])))
    return claims

def _noun(color, shape, n, rng, definite=False):  # "two red circles", "a red circle", "the red circle"
    return ['the' if definite else _pick(rng, NUMBER_WORDS[n]), color, shape if n == 1 else PLURALS[shape]]

def _phrase(claims, rng, plain):
    """One random phrasing of the claims as a list of tokens; plain=True gives the shortest form."""
    groups = [c[1:] for c in claims if c[0] == 'count']         # (color, shape, n), randomly ordered below
    total = next(c[1] for c in claims if c[0] == 'total')
    rel = next((c[1:] for c in claims if c[0] == 'rel'), None)  # ((color, shape), rel, (color, shape))
    form = None if rel is None else 'embedded' if plain else _pick(rng, ('embedded', 'with', 'sentence'))
    items = []
    if rel is not None:
        rel_words = _pick(rng, REL_PHRASES[rel[1]]).split()
        if form == 'embedded':  # "a green triangle to the left of a yellow circle" is the first item
            items.append(_noun(*rel[0], 1, rng) + rel_words + _noun(*rel[2], 1, rng))
    items += [_noun(*groups[i], rng) for i in rng.permutation(len(groups))
              if form != 'embedded' or groups[i][:2] not in (rel[0], rel[2])]
    body = items[0]
    for k, item in enumerate(items[1:], 2):  # "a, b and c" or "a, b, and c"
        last, oxford = k == len(items), k > 2 and rng.random() < 0.5
        body = body + ([',', 'and'] if last and oxford else ['and'] if last else [',']) + item
    words = [] if plain else _pick(rng, PREFIXES).split()
    if not plain and len(groups) > 1 and rng.random() < P_TOTAL:  # "three shapes: ..."
        words += [NUMBER_WORDS[total][-1], _pick(rng, TOTAL_NOUNS), ':']
    elif words == ['there', 'are'] and body[0] in NUMBER_WORDS[1]:
        words = ['there', 'is']
    words += body
    if form == 'with':  # "..., with the red circle above the blue square"
        words += [',', 'with'] + _noun(*rel[0], 1, rng, True) + rel_words + _noun(*rel[2], 1, rng, True)
    elif form == 'sentence':  # "... . the red circle is above the blue square"
        words += ['.'] + _noun(*rel[0], 1, rng, True) + ['is'] + rel_words + _noun(*rel[2], 1, rng, True)
    if not plain and rng.random() < 0.5:
        words.append('.')
    return words

def verbalize(claims, rng):
    """Claims -> caption text, one of many phrasings, at most MAX_WORDS words; deterministic given rng."""
    for attempt in range(10):
        words = _phrase(claims, rng, plain=attempt == 9)
        if sum(w.isalpha() for w in words) <= MAX_WORDS:
            break
    return re.sub(r' ([,.:])', r'\1', ' '.join(words))

def caption(scene, rng):
    """A random caption that is true of the scene."""
    return verbalize(scene_claims(scene, rng), rng)

def tokenize(text):
    """Lower-cased words and punctuation marks: 'Two red circles.' -> ['two', 'red', 'circles', '.']"""
    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())

# the grammar as regular expressions over normalised text; NP = noun phrase, capturing (colour, shape)
_NUM, _COL, _SHP = ('|'.join(ws) for ws in ([w for ws in NUMBER_WORDS.values() for w in ws], COLORS, SHAPES))
_REL = '|'.join(p for ps in REL_PHRASES.values() for p in ps)
_PRE = '|'.join(p for p in PREFIXES + ('there is',) if p)
_NP, _THE_NP = rf"(?:{_NUM}) ({_COL}) ({_SHP})s?", rf"the ({_COL}) ({_SHP})"
_ITEM = rf"{_NP}(?: (?:{_REL}) {_NP})?"  # "a red circle" or "a red circle above a blue square"
_TAIL = rf", with {_THE_NP} (?:{_REL}) {_THE_NP}|\. {_THE_NP} is (?:{_REL}) {_THE_NP}"
_GRAMMAR = re.compile(  # [prefix] [total:] item (sep item)* [tail] [.]
    rf"(?:(?:{_PRE}) )?(?:(?:{_NUM}) (?:{'|'.join(TOTAL_NOUNS)}): )?"
    rf"{_ITEM}(?:(?:, |, and | and ){_ITEM})*(?:{_TAIL})?\.?")

def parse_caption(text):
    """Caption text -> claims (format in the module docstring). Raises ValueError off-grammar."""
    s = re.sub(r' ([,.:])', r'\1', ' '.join(tokenize(text)))  # normalised spacing
    if not _GRAMMAR.fullmatch(s):
        raise ValueError(f'not a caption of the toy grammar: {text!r}')
    numbers = {w: n for n, ws in NUMBER_WORDS.items() for w in ws}
    counts = {}
    for num, color, shape, plural in re.findall(rf"\b({_NUM}) ({_COL}) ({_SHP})(s?)\b", s):
        if (numbers[num] == 1) != (plural == '') or (color, shape) in counts:
            raise ValueError(f'bad number agreement or a group mentioned twice: {text!r}')
        counts[color, shape] = numbers[num]
    total = re.search(rf"\b({_NUM}) (?:{'|'.join(TOTAL_NOUNS)}):", s)
    claims = [('count', c, sh, counts[c, sh]) for c in COLORS for sh in SHAPES if (c, sh) in counts]
    claims.append(('total', numbers[total[1]] if total else sum(counts.values())))
    rel_names = {p: r for r, ps in REL_PHRASES.items() for p in ps}
    rels = re.findall(rf"(?:{_NUM}|the) ({_COL}) ({_SHP})s? (?:is )?({_REL}) "
                      rf"(?:{_NUM}|the) ({_COL}) ({_SHP})s?\b", s)
    for ca, sa, rel, cb, sb in rels:
        if len(rels) > 1 or counts.get((ca, sa)) != 1 or counts.get((cb, sb)) != 1 or (ca, sa) == (cb, sb):
            raise ValueError(f'a relation needs two distinct single objects, and at most one: {text!r}')
        claims.append(('rel', (ca, sa), rel_names[rel], (cb, sb)))
    return claims

# -----------------------------------------------------------------------------
# detection and scoring (pixel operations only, no learned model)
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)  # (K, 3)

def unmix(image):
    """Model each pixel p as a mix of the background and palette colour c (anti-aliased and blurred
    edges are such mixes): bg - p = alpha * (bg - c) + residual. Returns alpha (H, W, K) and
    tan (H, W, K) = |residual| / |alpha * (bg - c)|, the tangent of the angle between the pixel's
    and the colour's direction (inf when alpha <= 0). bg is estimated, so a global shift cancels."""
    img = image.astype(np.float64)
    bg = np.clip(np.median(img.reshape(-1, 3), axis=0), 200, 255)  # (3,) most pixels are background
    d = bg - img                                                    # (H, W, 3) darkening
    dirs = np.array(BACKGROUND, np.float64) - _PALETTE              # (K, 3)
    alpha = d @ (dirs / (dirs ** 2).sum(1, keepdims=True)).T        # (H, W, K) least-squares fit
    off = np.linalg.norm(d[..., None, :] - alpha[..., None] * dirs, axis=-1)  # (H, W, K)
    along = alpha * np.linalg.norm(dirs, axis=1)                    # (H, W, K)
    return alpha, np.where(along > 0, off / np.maximum(along, 1e-9), np.inf)

def classify_pixels(alpha, tan):
    """unmix() output -> (H, W) int: index into COLORS of each object pixel (the colour at the
    smallest angle, at least half-way from the background), -1 for background."""
    k = tan.argmin(-1)                                              # (H, W)
    a, t = (np.take_along_axis(v, k[..., None], -1)[..., 0] for v in (alpha, tan))
    return np.where((a >= MIN_ALPHA) & (t <= MAX_OFF_AXIS), k, -1)

def connected_components(labels):
    """8-connected components of equal labels >= 0: (H, W) int, each pixel gets the flat index
    of the first pixel of its component, -1 for background. Min-label propagation + pointer jumping."""
    H, W = labels.shape
    big = H * W
    comp = np.where(labels >= 0, np.arange(big).reshape(H, W), big)
    lab = np.pad(labels, 1, constant_values=-2)
    while True:
        cp, new = np.pad(comp, 1, constant_values=big), comp.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                same = (lab[1 + dy:1 + dy + H, 1 + dx:1 + dx + W] == labels) & (labels >= 0)
                new = np.where(same, np.minimum(new, cp[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]), new)
        flat = new.reshape(-1)  # pointer jumping: a pixel's label is a pixel of the same component
        fg = flat < big
        for _ in range(3):
            flat[fg] = flat[flat[fg]]
        if (new == comp).all():
            return np.where(comp < big, comp, -1)
        comp = new

def _dilate(mask):
    """3x3 binary dilation: (H, W) bool -> (H, W) bool."""
    p, (H, W) = np.pad(mask, 1), mask.shape
    return np.any([p[1 + dy:1 + dy + H, 1 + dx:1 + dx + W] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)

def detect(image):
    """Objects in an image: list of {'shape', 'color', 'x', 'y', 'r', 'area'}, sorted by x.
    Pixels -> colour labels -> connected components; then, on each component's soft alpha map
    (which keeps area and centroid exact under anti-aliasing and blur), the shape is the template
    (sharp or 3x3-blurred) closest in squared error, placed at the alpha centroid with the
    radius the alpha area implies."""
    alpha, tan = unmix(image)                  # (H, W, K) each
    labels = classify_pixels(alpha, tan)       # (H, W)
    comp = connected_components(labels)
    H, W = labels.shape
    ids, areas = np.unique(comp[comp >= 0], return_counts=True)
    objects = []
    for cid, area in zip(ids, areas):
        if area < MIN_AREA * H * W / IMAGE_SIZE ** 2:
            continue
        mask = comp == cid
        k = labels[mask][0]
        ys, xs = np.nonzero(_dilate(mask))  # the component plus its faint edge pixels
        pad = max(np.ptp(xs), np.ptp(ys)) // 2 + 3  # window with room for every candidate template
        x0, y0 = xs.min() - pad, ys.min() - pad
        a = np.zeros((np.ptp(ys) + 1 + 2 * pad, np.ptp(xs) + 1 + 2 * pad))  # (h, w) alpha window
        a[ys - y0, xs - x0] = alpha[ys, xs, k]
        A = a.sum()  # soft area, px
        x = x0 + (a.sum(0) * np.arange(a.shape[1])).sum() / A  # alpha-weighted centroid
        y = y0 + (a.sum(1) * np.arange(a.shape[0])).sum() / A
        errs = []
        for shape in SHAPES:
            cov = _coverage(shape, x, y, np.sqrt(A / AREA_FACTOR[shape]), x0, y0, a.shape[1], a.shape[0])
            errs.append(min(((a - cov) ** 2).sum(), ((a - box_blur(cov[..., None])[..., 0]) ** 2).sum()))
        shape = SHAPES[int(np.argmin(errs))]
        objects.append(dict(shape=shape, color=list(COLORS)[k], x=float(x), y=float(y),
                            r=float(np.sqrt(A / AREA_FACTOR[shape])), area=int(area)))
    return sorted(objects, key=lambda o: (o['x'], o['y']))

def check_claims(claims, objects):
    """One bool per claim: is it true of these objects (scene dicts or detect() output)?"""
    groups = Counter((o['color'], o['shape']) for o in objects)
    ok = []
    for claim in claims:
        if claim[0] == 'count':
            ok.append(groups[claim[1], claim[2]] == claim[3])
        elif claim[0] == 'total':
            ok.append(len(objects) == claim[1])
        else:  # 'rel': both referents must be unique in the image
            _, a, rel, b = claim
            oa = [o for o in objects if (o['color'], o['shape']) == a]
            ob = [o for o in objects if (o['color'], o['shape']) == b]
            ok.append(len(oa) == 1 and len(ob) == 1 and relation_holds(oa[0], ob[0], rel))
    return ok

def score(image, caption):
    """(fraction of the caption's claims the image satisfies, all of them satisfied?)"""
    ok = check_claims(parse_caption(caption), detect(image))
    return sum(ok) / len(ok), all(ok)


def error_kind(image, caption):
    """What is wrong with an image for its caption: 'ok', 'blank', 'extra' (more objects than the caption
    says), 'missing' (fewer), or 'attr' (the right number, with a wrong colour, shape or relation)."""
    claims, objs = parse_caption(caption), detect(image)
    if all(check_claims(claims, objs)):
        return 'ok'
    total = next(c[1] for c in claims if c[0] == 'total')
    return 'blank' if not objs else 'extra' if len(objs) > total else 'missing' if len(objs) < total else 'attr'

def surplus(image, caption):
    """What an over-full image ('extra') holds: (objects in both the top and the bottom half, surplus objects that
    repeat a prompted colour and shape, objects of a prompted colour with an unprompted shape). None if the
    image does not hold more objects than the caption says."""
    claims, objs = parse_caption(caption), detect(image)
    if len(objs) <= next(c[1] for c in claims if c[0] == 'total'):
        return None
    want = Counter({(c[1], c[2]): c[3] for c in claims if c[0] == 'count'})
    got = Counter((o['color'], o['shape']) for o in objs)
    copies = sum(max(got[key] - n, 0) for key, n in want.items())
    colours = {c for c, _ in want}
    recoloured = sum(n for (c, sh), n in got.items() if (c, sh) not in want and c in colours)
    both_rows = min(o['y'] for o in objs) < image.shape[0] / 2 < max(o['y'] for o in objs)
    return both_rows, copies, recoloured

# -----------------------------------------------------------------------------
# data: prompt splits, pretraining pairs, augmentation

def prompt_split(n_train, n_heldout, seed=0):
    """(train_prompts, heldout_prompts): unique caption strings of random scenes, deterministic in
    seed. The splits are disjoint as meanings, not only as strings: all phrasings of one claims
    list go to the same split, so held-out prompts describe scenes never prompted in RL."""
    rng = np.random.default_rng(seed)
    p_heldout = n_heldout / max(1, n_train + n_heldout)
    split_of, seen, out, need = {}, set(), ([], []), (n_train, n_heldout)
    for _ in range(1000 * (n_train + n_heldout + 1)):
        if len(out[0]) == n_train and len(out[1]) == n_heldout:
            return out
        claims = scene_claims(random_scene(rng), rng)
        text = verbalize(claims, rng)
        s = split_of.setdefault(tuple(claims), int(rng.random() < p_heldout))
        if text not in seen and len(out[s]) < need[s]:
            seen.add(text)
            out[s].append(text)
    raise RuntimeError(f'could not find {n_train} + {n_heldout} distinct prompts')

def caption_scene_pairs(n, seed=0, exclude=(), max_objects=MAX_OBJECTS, layout=LAYOUT):
    """n (image uint8 (H, W, 3), caption) pairs of random scenes of 1..max_objects objects; captions in
    `exclude` are skipped."""
    rng, exclude, pairs = np.random.default_rng(seed), set(exclude), []
    while len(pairs) < n:
        scene = random_scene(rng, max_objects=max_objects, layout=layout)
        text = caption(scene, rng)
        if text not in exclude:
            pairs.append((render(scene), text))
    return pairs

def box_blur(image, k=3):
    """k x k box blur with edge padding: (H, W, C) -> (H, W, C) float."""
    H, W = image.shape[:2]
    p = np.pad(image.astype(np.float64), ((k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode='edge')
    return sum(p[i:i + H, j:j + W] for i in range(k) for j in range(k)) / k ** 2

def augment(image, rng):
    """Artefacts of a generated image, for training a robust captioner: +-2 px jitter, 3x3 blur
    (half the time), a global colour shift of +-20 per channel, gaussian noise of std <= 15."""
    H, W = image.shape[:2]
    dx, dy = rng.integers(-2, 3, size=2)
    img = np.pad(image.astype(np.float64), ((2, 2), (2, 2), (0, 0)), mode='edge')  # (H + 4, W + 4, 3)
    img = img[2 + dy:2 + dy + H, 2 + dx:2 + dx + W]
    if rng.random() < 0.5:
        img = box_blur(img)
    img = img + rng.uniform(-20, 20, size=3) + rng.normal(0, rng.uniform(0, 15), size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# -----------------------------------------------------------------------------
# the toy MODELS: a tiny Z-Image policy and a tiny Qwen3-VL captioner, in the real architectures,
# pretrained here and saved as ordinary diffusers / transformers directories (python toy.py)

TOY_DIR = 'out/toy'             # where prepare() writes models and prompt files
N_TRAIN, N_HELDOUT = 2000, 200  # RL prompts / held-out prompts (disjoint meanings)
N_PRETRAIN = 6000               # (render, caption) pairs for pretraining (held-out captions excluded)
VAE_STEPS = 600                 # autoencoder steps (64x64 -> 16x16x4 latents), batch VAE_BATCH
VAE_BATCH = 8                   # small batches, many steps: the detector reads 100% of reconstructions
DIT_LR = 1e-3                   # policy learning rate (warm-up, then linear decay to 10%)
DIT_STEPS = 4000                # policy steps: recognisable shapes, some blank images; 8.6% / 10.9% held-out
                                # all-correct (train.py's eval, seed 1337; first / second build, TOY.md)
DIT_BATCH = 16                  # policy batch: small batches, many steps (5-7 steps/s on 2 cores)
VLM_STEPS = 700                 # captioner steps (the "strong" reward VLM)
VLM_WEAK_STEPS = 150            # a weaker captioner, for the stronger-VLM-helps ablation
VLM_MAX_OBJECTS = CELLS         # captioners see scenes of 1 to as many objects as the layout holds, the policy
                                # 1-MAX_OBJECTS: the base often draws 3-4 shapes for a 1-2 shape prompt
BATCH = 32                      # captioner batch
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
           "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen's pre-tokenizer split: a newline is its own piece, so no BPE merge crosses the assistant header.
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def vl_template(system=None, think=False):
    """A Qwen-style chat template; content is a string or a list of {'type': 'image'|'text'}.
    system: a default system prompt (Qwen2.5-VL adds one); think: an empty think block before
    the assistant's content (as Qwen3 thinking templates do); enable_thinking=False adds it to
    the generation prompt like Qwen3."""
    sys_part = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}"
                "{%- endif %}") if system else ""
    think_part = "{%- if message['role'] == 'assistant' %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}" if think else ""
    return (sys_part +
            "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}" + think_part +
            "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
            "{%- for c in message['content'] %}{%- if c['type'] == 'image' %}"
            "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}{%- elif c['type'] == 'text' %}{{- c['text'] }}"
            "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
            "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
            "{%- endif %}{%- endif %}")


def bpe_tokenizer(corpus, vocab_size=400, template=None, special=SPECIAL):
    """A byte-level BPE trained in-process on `corpus`, wrapped as transformers' Qwen2Tokenizer."""
    import json
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    t = Tokenizer(models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.train_from_iterator(list(corpus), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    m = json.loads(t.to_str())['model']
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(' ')) for x in m['merges']]
    return Qwen2Tokenizer(vocab=m['vocab'], merges=merges, additional_special_tokens=list(special[1:]),
                          chat_template=template or vl_template())


def _toy_tokenizer():
    words = ' '.join(VOCAB + list(QUERY_WORDS))
    corpus = [words, words.capitalize(), 'Describe this image in detail.', 'user\n assistant\n system\n'] * 50
    return bpe_tokenizer(corpus, vocab_size=700)          # enough merges for whole words


def _images_to_tensor(images):
    import torch
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [B, 3, H, W] in [-1, 1]


def _progress(n, desc):
    from tqdm import tqdm
    return tqdm(range(n), desc=desc, mininterval=2)


def train_policy(out, pairs, steps_vae=VAE_STEPS, steps_dit=DIT_STEPS, lr=DIT_LR, seed=0):
    """A tiny Z-Image (VAE + Qwen3 text encoder + ZImageTransformer2DModel) trained by flow matching."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model
    torch.manual_seed(seed)
    imgs = _images_to_tensor([p[0] for p in pairs])          # [N, 3, 64, 64]
    caps = [p[1] for p in pairs]
    # 1. the autoencoder: 64x64x3 -> 16x16x4, trained as a plain autoencoder on the posterior mean
    #    at batch 8 (measured: 100% of reconstructions pass the detector after 600 steps; posterior samples
    #    at batch 32 for 200 steps: 19.5%)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D'] * 3,
                        up_block_types=['UpDecoderBlock2D'] * 3, block_out_channels=[16, 32, 32],
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                        mid_block_add_attention=False)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in _progress(steps_vae, 'toy VAE'):
        x = imgs[torch.randint(len(imgs), (VAE_BATCH,))]
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        loss = (rec - x).abs().mean()
        opt.zero_grad(); loss.backward(); opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(imgs[i:i + 256]).latent_dist.mean for i in range(0, len(imgs), 256)])
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    x0_all = (z - shift) * scale                              # [N, 4, 16, 16] the policy's latent space
    # 2. text encoder + transformer, jointly, by flow matching in Z-Image's convention
    tok = _toy_tokenizer()
    te = Qwen3Model(Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, head_dim=16, vocab_size=len(tok), max_position_embeddings=256))
    tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=96, n_layers=3,
                                  n_refiner_layers=1, n_heads=4, n_kv_heads=4, norm_eps=1e-5, qk_norm=True,
                                  cap_feat_dim=64, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 8, 8],
                                  axes_lens=[256, 32, 32])
    with torch.no_grad():
        tr.x_pad_token.normal_(0, 0.02)
        tr.cap_pad_token.normal_(0, 0.02)
    params = list(te.parameters()) + list(tr.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.1, 1 - s / steps_dit))
    for step in _progress(steps_dit, 'toy policy'):
        idx = torch.randint(len(caps), (DIT_BATCH,))
        text = [caps[i] if torch.rand(()) > 0.1 else '' for i in idx.tolist()]  # 10% empty: CFG
        chat = [tok.apply_chat_template([{'role': 'user', 'content': t}], tokenize=False, add_generation_prompt=True,
                                        enable_thinking=True) for t in text]
        t_in = tok(chat, padding=True, return_tensors='pt')
        hid = te(input_ids=t_in.input_ids, attention_mask=t_in.attention_mask, output_hidden_states=True).hidden_states[-2]
        feats = [h[m.bool()] for h, m in zip(hid, t_in.attention_mask)]
        x0 = x0_all[idx]
        eps = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(DIT_BATCH))         # logit-normal noise levels
        s = sigma.view(-1, 1, 1, 1)
        xs = (1 - s) * x0 + s * eps                            # x_sigma
        pred = torch.stack(tr(list(xs.unsqueeze(2).unbind(0)), 1 - sigma, feats, return_dict=False)[0]).squeeze(2)
        loss = (pred - (x0 - eps)).pow(2).mean()               # Z-Image predicts x0 - eps
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step()
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(transformer=tr.eval(), vae=vae, scheduler=sch, text_encoder=te.eval(), tokenizer=tok)
    pipe.save_pretrained(out)


def train_vlm(out, pairs, query, steps=VLM_STEPS, seed=0):
    """A tiny Qwen3-VL captioner: teacher forcing on the caption given [image] + query, on augmented
    renders (noise, blur, jitter, colour shifts) so it reads the policy's imperfect samples too."""
    import torch
    from PIL import Image
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = _toy_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=None, eos_token_id=ids['<|im_end|>'],
                         rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0, 'mrope_section': [4, 6, 6],
                                          'mrope_interleaved': True}),
        vision_config=dict(depth=2, hidden_size=96, intermediate_size=192, num_heads=4, out_hidden_size=128,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[1]),
        image_token_id=ids['<|image_pad|>'], video_token_id=ids['<|video_pad|>'], bos_token_id=None,
        eos_token_id=ids['<|im_end|>'], vision_start_token_id=ids['<|vision_start|>'],
        vision_end_token_id=ids['<|vision_end|>'])
    model = Qwen3VLForConditionalGeneration(cfg)
    ip = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3, size={'shortest_edge': 64 * 64, 'longest_edge': 64 * 64})
    # the image-only processor (no torchvision), as reward.load_processor builds it
    sub = type(Qwen3VLProcessor.__name__, (Qwen3VLProcessor,),
               {'get_attributes': classmethod(lambda c: ['image_processor', 'tokenizer'])})
    proc = sub(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template)
    head = proc.apply_chat_template([{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': query}]}],
                                    tokenize=False, add_generation_prompt=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / steps))
    model.train()
    for step in _progress(steps, f'toy VLM ({steps} steps)'):
        batch = [pairs[i] for i in rng.integers(len(pairs), size=BATCH)]
        ims = [Image.fromarray(augment(im, rng) if rng.random() < 0.8 else im) for im, _ in batch]
        enc = proc(text=[head + c for _, c in batch], images=ims, return_tensors='pt', padding=True)
        labels = enc['input_ids'].clone()
        n_head = len(proc(text=[head], images=ims[:1])['input_ids'][0])  # same length for every 64x64 image
        labels[:, :n_head] = -100                              # score only the caption (what the reward reads)
        labels[enc['attention_mask'] == 0] = -100
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
    model.eval().save_pretrained(out)
    proc.save_pretrained(out)


def _built(d, recipe):
    """Is d a finished build of this recipe (step counts, pairs, object range, query)? A build of another
    recipe (or of an older toy.py, which wrote none) is rebuilt, with a message. Architecture and
    learning-rate edits are not in the recipe: delete the model directory after such an edit."""
    import json
    import os
    path = os.path.join(d, 'toy_recipe.json')
    if not os.path.isdir(d):
        return False
    old = json.load(open(path)) if os.path.isfile(path) else 'unknown (no toy_recipe.json)'
    if isinstance(old, dict):
        old.setdefault('layout', [2, 2])                      # built before LAYOUT was a constant
    if old != recipe:
        print(f"{d} was built with recipe {old}; the recipe is now {recipe}: rebuilding it")
    return old == recipe


def prepare(out_dir=TOY_DIR, query='Describe this image in detail.', steps=None, n_pretrain=N_PRETRAIN):
    """Build whatever is missing under out_dir: prompt files, the policy, the two captioners. Each model
    directory holds the recipe it was built with (toy_recipe.json: steps, pairs, layout, object range, query); a
    model of another recipe is rebuilt, and prompt files of another world are rewritten.
    steps: (vae, dit, vlm, weak vlm) pretraining steps; None = the constants (tests pass tiny ones)."""
    vae_s, dit_s, vlm_s, weak_s = steps or (VAE_STEPS, DIT_STEPS, VLM_STEPS, VLM_WEAK_STEPS)
    import json
    import os
    import shutil
    os.makedirs(out_dir, exist_ok=True)
    train, heldout = prompt_split(N_TRAIN, N_HELDOUT, seed=0)
    for name, rows in (('train.jsonl', train), ('heldout.jsonl', heldout)):
        path = os.path.join(out_dir, name)
        text = ''.join(json.dumps({'prompt': p, 'id': str(i)}) + '\n' for i, p in enumerate(rows))
        old = open(path).read() if os.path.isfile(path) else None
        if old != text:
            if old is not None:                                # another world's prompts (an edited constant)
                print(f"{path} holds the prompts of another toy world: rewriting it")
            with open(path + '.tmp', 'w') as f:
                f.write(text)
            os.replace(path + '.tmp', path)
    data = dict(n_pretrain=n_pretrain, seed=1, layout=list(LAYOUT))  # pretraining pairs: held-out captions excluded
    vlm = lambda s: dict(data, max_objects=VLM_MAX_OBJECTS, steps=s, query=query)
    pairs = {}                                                # max_objects -> (image, caption) pairs
    for sub, recipe, fn in (
            ('zimage', dict(data, max_objects=MAX_OBJECTS, vae_steps=vae_s, dit_steps=dit_s),
             lambda d, p: train_policy(d, p, vae_s, dit_s)),
            ('vlm', vlm(vlm_s), lambda d, p: train_vlm(d, p, query, steps=vlm_s)),
            ('vlm_weak', vlm(weak_s), lambda d, p: train_vlm(d, p, query, steps=weak_s))):
        d = os.path.join(out_dir, sub)
        if _built(d, recipe):
            continue
        m = recipe['max_objects']
        if m not in pairs:                                     # the two captioners share their pairs
            pairs[m] = caption_scene_pairs(n_pretrain, data['seed'], exclude=heldout, max_objects=m)
        fn(d + '.tmp', pairs[m])                               # a killed run leaves no half-written model
        with open(os.path.join(d + '.tmp', 'toy_recipe.json'), 'w') as f:
            json.dump(recipe, f)
        if os.path.isdir(d):                                   # the stale build goes only once the new one is whole
            shutil.rmtree(d)
        os.replace(d + '.tmp', d)
    return {k: os.path.join(out_dir, k) for k in ('zimage', 'vlm', 'vlm_weak', 'train.jsonl', 'heldout.jsonl')}


def pretraining_meanings(out_dir=TOY_DIR):
    """The meanings (claim tuples) of the captions the toy policy in out_dir was pretrained on, rebuilt from
    its toy_recipe.json. Pretraining skips held-out caption strings, so a held-out meaning with few
    phrasings (one object) can be missing from it altogether (eval.py toy --meanings splits on this)."""
    import json
    import os
    path = os.path.join(out_dir, 'zimage', 'toy_recipe.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path}: build the toy world first (python toy.py, or python train.py config/toy.py)")
    with open(path) as f:
        rec = json.load(f)
    with open(os.path.join(out_dir, 'heldout.jsonl')) as f:
        heldout = [json.loads(line)['prompt'] for line in f if line.strip()]
    pairs = caption_scene_pairs(rec['n_pretrain'], rec['seed'], exclude=heldout, max_objects=rec['max_objects'],
                                layout=tuple(rec.get('layout', (2, 2))))  # builds before the layout was a constant: 2 x 2
    return {tuple(parse_caption(c)) for _, c in pairs}


def accuracy(image, prompt):
    """Eval metric for train.py (eval_metric='toy:accuracy'): 1.0 if every claim of the prompt holds."""
    return float(score(image, prompt)[1])


def detector_reward(images, rows):
    """The oracle reward (reward_fn='toy:detector_reward'): fraction of the prompt's claims the detector confirms."""
    import torch
    arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return torch.tensor([score(a, r['prompt'])[0] for a, r in zip(arr, rows)], dtype=torch.float32)


if __name__ == '__main__':
    print(prepare())
