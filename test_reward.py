"""Fast tests of reward.py (the PromptEcho reward) on tiny random VLMs built in conftest.py: python -m pytest -q"""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import reward
from conftest import vl_template, vlm_components



def _img(seed, h=64, w=48):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _reference_reward(model, proc, image, query, label):
    """Independent: full chat (with end-of-turn), full-sequence logits (the model's own head, soft cap and all),
    label positions = the tokens whose characters overlap the label's in the assistant turn."""
    msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': query}]},
            {'role': 'assistant', 'content': [{'type': 'text', 'text': label}]}]
    full = proc.apply_chat_template(msgs, tokenize=False)
    qwen = hasattr(proc.image_processor, 'merge_size')
    kw = {'images_kwargs': {'size': {'shortest_edge': 28 * 28, 'longest_edge': reward.MAX_PIXELS}}} if qwen else {}
    msgs[0]['content'][0]['image'] = image                         # transformers' own chat encoding (BOS rule and all)
    enc = proc.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors='pt', processor_kwargs=kw)
    if hasattr(proc, 'full_image_sequence'):                       # Gemma 3: <start_of_image> -> the whole block
        expanded = full.replace(proc.boi_token, proc.full_image_sequence)
    else:                                                          # Qwen, LLaVA: one placeholder -> n of them
        n_img = int((enc['input_ids'][0] == proc.image_token_id).sum())
        expanded = full.replace(proc.image_token, proc.image_token * n_img)
    t = next(t for t in (proc.tokenizer(expanded, return_offsets_mapping=True, add_special_tokens=a) for a in (False, True))
             if t['input_ids'] == enc['input_ids'][0].tolist())    # offsets of exactly the encoded tokens
    start = expanded.rindex(label)                                 # the label's characters in the assistant turn
    pos = [i for i, (a, b) in enumerate(t['offset_mapping']) if a < start + len(label) and b > start and b > a]
    with torch.no_grad():
        logits = model(**enc).logits[0].float()                   # [T, vocab] the plain way
    ids = enc['input_ids'][0]
    lp = torch.stack([logits[p - 1].log_softmax(-1)[ids[p]] for p in pos])
    return lp.mean().item(), [proc.tokenizer.decode([int(ids[p])]) for p in pos]


@pytest.mark.parametrize('family', ['qwen3', 'qwen2.5', 'llava', 'gemma3'])
def test_reward_equals_independent_computation(family, vlm_dir):
    model, proc = reward.load_vlm(vlm_dir(family))                  # any HF image-text-to-text chat model (SPEC)
    assert type(proc).__name__ in ('Qwen3VLProcessor', 'Qwen2_5_VLProcessor', 'LlavaProcessor', 'Gemma3Processor')
    if family.startswith('qwen'):                                   # not just a tokenizer, image tokens expanded
        enc = proc(text=['<|image_pad|>'], images=[_img(0)], return_tensors='pt')
        n_pad = (enc['input_ids'] == model.config.image_token_id).sum().item()
        assert n_pad == enc['image_grid_thw'][0].prod().item() // 4 and n_pad > 1
    labels = ['a red dog', 'a photo of a blue cat and a green monkey, hello world']
    ims = [_img(1), _img(2, 40, 72)]
    r, toks = reward.promptecho_reward(model, proc, ims, labels, return_tokens=True)
    for i in range(2):
        want, want_toks = _reference_reward(model, proc, ims[i], reward.QUERY, labels[i])
        assert abs(r[i].item() - want) < 1e-5 + 1e-6 * abs(want)   # a few float32 ulps (a random tiny Gemma 3 scores ~-190)
        assert [s for s, _ in toks[i]] == want_toks                 # exactly the label's tokens are scored
        assert ''.join(s for s, _ in toks[i]).replace(' ', '') == labels[i].replace(' ', '')  # no end-of-turn token
    assert r.dtype == torch.float32 and r.shape == (2,)


def test_processor_without_torchvision_reads_the_legacy_chat_template_json(vlm_dir, tmp_path):
    import json, shutil
    d = tmp_path / 'vlm'
    shutil.copytree(vlm_dir('qwen3'), d)
    want = (d / 'chat_template.jinja').read_text()
    (d / 'chat_template.jinja').unlink()                       # hub layout: the processor's template as .json
    (d / 'chat_template.json').write_text(json.dumps({'chat_template': want}))
    cfg = json.loads((d / 'tokenizer_config.json').read_text())
    cfg['chat_template'] = '{{ messages[0].content }}'          # a different (text-only) template in the tokenizer
    (d / 'tokenizer_config.json').write_text(json.dumps(cfg))
    proc = reward.load_processor(str(d))
    assert type(proc).__name__ == 'Qwen3VLProcessor'
    assert proc.chat_template == want                           # the processor's template, not the tokenizer's


def test_model_head_is_the_models_own():
    # the reward applies the output embedding (+ soft cap) itself, on label positions only; which one must be
    # decided by the model's forward: Gemma 2/3 text models cap, Gemma 3's VLM does not, Granite scales
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GraniteConfig, GraniteForCausalLM
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 7))
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64)
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(**small, head_dim=16, final_logit_softcapping=30.0)).eval()
    with torch.no_grad():
        gemma.lm_head.weight.mul_(300.0)                            # logits of +-100: capped and plain differ
        hidden = gemma.model(input_ids=ids).last_hidden_state
        head = reward.model_head(gemma, {'input_ids': ids}, hidden)
        want = gemma(input_ids=ids).logits.float()                  # [2, 7, 64] the model's own, capped
        assert gemma._promptecho_head == 'cap' and want.abs().max() < 30.0
        assert torch.allclose(head(hidden), want, atol=1e-4)
        granite = GraniteForCausalLM(GraniteConfig(**small, logits_scaling=4.0)).eval()
        with pytest.raises(ValueError, match='post-processes its logits'):
            reward.model_head(granite, {'input_ids': ids}, granite.model(input_ids=ids).last_hidden_state)


def test_processor_fallback_is_for_qwen_only(vlm_dir, tmp_path):
    d = tmp_path / 'llava'
    shutil.copytree(vlm_dir('llava'), d)
    (d / 'processor_config.json').unlink()                     # AutoProcessor now finds only the tokenizer
    with pytest.raises(ValueError, match="only builds Qwen-VL ones"):
        reward.load_processor(str(d))                           # not a Qwen image processor under a LLaVA


def test_reward_mask_independent_of_context_and_batching(vlm_dir):
    model, proc = reward.load_vlm(vlm_dir('qwen3'))
    labels = ['a red dog', 'green monkey dance in a photo of a cat', 'hello']
    ims = [_img(3, 64, 64), _img(4, 32, 96), _img(5, 80, 40).convert('L')]   # a non-RGB image is converted
    r1, t1 = reward.promptecho_reward(model, proc, ims, labels, return_tokens=True)
    r2, t2 = reward.promptecho_reward(model, proc, ims, labels, query='What is shown here?', return_tokens=True)
    assert [[s for s, _ in t] for t in t1] == [[s for s, _ in t] for t in t2]  # same scored tokens
    assert not torch.allclose(r1, r2)                                          # different context
    n_tok = [len(proc.tokenizer(l, add_special_tokens=False)['input_ids']) for l in labels]
    assert [len(t) for t in t1] == n_tok
    one = torch.cat([reward.promptecho_reward(model, proc, [im], [l]) for im, l in zip(ims, labels)])
    assert torch.allclose(r1, one, atol=1e-5)                                  # batched == one by one
    chunked = reward.promptecho_reward(model, proc, ims, labels, max_batch=2)
    assert torch.allclose(r1, chunked, atol=1e-5)
    rgb = reward.promptecho_reward(model, proc, [ims[2].convert('RGB')], [labels[2]])
    assert abs(rgb.item() - r1[2].item()) < 1e-6
    tensor_imgs = torch.stack([torch.from_numpy(np.array(_img(6, 32, 32))).permute(2, 0, 1).float() / 255] * 2)
    rt = reward.promptecho_reward(model, proc, tensor_imgs, ['a red dog', 'a red dog'])
    rp = reward.promptecho_reward(model, proc, [_img(6, 32, 32)], ['a red dog'])
    assert torch.allclose(rt, rp.expand(2), atol=1e-5)                         # [B,3,H,W] in [0,1] accepted


def test_reward_think_template_and_system_prompt(tmp_path):
    # a template that inserts an empty think block before the assistant content (Qwen3 thinking style)
    model, proc = vlm_components('qwen3', template=vl_template(think=True))
    r, toks = reward.promptecho_reward(model, proc, [_img(7)], ['a blue cat'], return_tokens=True)
    want, want_toks = _reference_reward(model, proc, _img(7), reward.QUERY, 'a blue cat')
    assert abs(r.item() - want) < 1e-5 and [s for s, _ in toks[0]] == want_toks
    ctx = reward.chat_context(proc, reward.QUERY, 'a blue cat')
    assert ctx.endswith('<think>\n\n</think>\n\n')                           # the block is context, not label
    # a system prompt changes the context, never the scored tokens
    model2, proc2 = vlm_components('qwen3', template=vl_template(system='You are a careful judge.'))
    _, toks2 = reward.promptecho_reward(model2, proc2, [_img(7)], ['a blue cat'], return_tokens=True)
    assert [s for s, _ in toks2[0]] == want_toks
    assert reward.chat_context(proc2, reward.QUERY, 'x').startswith('<|im_start|>system\nYou are a careful judge.')
    # a template that rewrites the content cannot be scored: a clear error, not a silent wrong mask
    proc.chat_template = proc.chat_template.replace("{{- c['text'] }}", "{{- c['text'] | upper }}")
    with pytest.raises(ValueError, match='verbatim'):
        reward.promptecho_reward(model, proc, [_img(7)], ['a blue cat'])


def test_reward_bad_input(vlm_dir, tmp_path):
    model, proc = reward.load_vlm(vlm_dir('qwen3'))
    with pytest.raises(ValueError, match='2 images but 1 labels'):
        reward.promptecho_reward(model, proc, [_img(0), _img(1)], ['a dog'])
    with pytest.raises(ValueError, match='empty label'):
        reward.promptecho_reward(model, proc, [_img(0)], ['  '])
    with pytest.raises(FileNotFoundError, match='not a transformers model directory'):
        reward.load_vlm(str(tmp_path))
    # a hub id ('org/name', the configs' default) is fetched; offline it is a clear error
    p = subprocess.run([sys.executable, '-c', "import reward; reward.load_vlm('org/no-such-vlm')"],
                       cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1'))
    assert 'VLM directory org/no-such-vlm does not exist, and fetching it as a hub id failed' in p.stderr
    with pytest.raises(FileNotFoundError, match='VLM directory ./no/such does not exist'):
        reward.load_vlm('./no/such')
    # a label longer than the context: decided = truncate with a warning, score the tokens that fit
    cfg = model.config.get_text_config()
    old, cfg.max_position_embeddings = cfg.max_position_embeddings, 60
    try:
        with pytest.warns(UserWarning, match='exceeds'):
            r, toks = reward.promptecho_reward(model, proc, [_img(0, 32, 32)], ['hello world ' * 40], return_tokens=True)
        n_ctx = len(proc(text=[reward.chat_context(proc, reward.QUERY, 'hello world ' * 40)], images=[_img(0, 32, 32)])['input_ids'][0])
        assert len(toks[0]) == 60 - n_ctx and torch.isfinite(r).all()
    finally:
        cfg.max_position_embeddings = old
    kept = [t for t, _ in toks[0]]
    want, want_toks = _reference_reward(model, proc, _img(0, 32, 32), reward.QUERY, ''.join(kept).strip())
    assert want_toks == kept and abs(r.item() - want) < 1e-5      # the label's first tokens, scored as usual


def test_reward_means_something():
    """Teach a tiny VLM two captions for two kinds of image; the matching caption must then win."""
    model, proc = vlm_components('qwen3', seed=1)
    rng = np.random.default_rng(0)

    def scene(color):                                              # noisy solid-colour images
        base = np.array(color, np.float32)
        return Image.fromarray(np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8))
    caps = {'red': 'a red dog', 'blue': 'a blue cat'}
    cols = {'red': (220, 30, 30), 'blue': (30, 30, 220)}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(80):                                         # teacher forcing on the label tokens only
        kinds = ['red', 'blue'] * 2
        texts = [reward.chat_context(proc, reward.QUERY, caps[k]) + caps[k] for k in kinds]
        enc = proc(text=texts, images=[scene(cols[k]) for k in kinds], return_tensors='pt', padding=True)
        labels = enc['input_ids'].clone()
        for i, k in enumerate(kinds):
            n = len(proc.tokenizer(caps[k], add_special_tokens=False)['input_ids'])
            L = int(enc['attention_mask'][i].sum())
            labels[i, :L - n] = -100
            labels[i, L:] = -100
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    ims = [scene(cols['red']), scene(cols['blue'])]
    right = reward.promptecho_reward(model, proc, ims, [caps['red'], caps['blue']])
    wrong = reward.promptecho_reward(model, proc, ims, [caps['blue'], caps['red']])
    assert (right > wrong + 0.3).all(), (right, wrong)


def test_ocr_label_and_infer_score(vlm_dir):
    lab = reward.ocr_label({'subtitle': ['Fresh daily'], 'main_title': ['BAKERY']})
    assert list(json.loads(lab)) == list(reward.OCR_KEYS)        # canonical key order
    assert json.loads(lab)['main_title'] == ['BAKERY'] and json.loads(lab)['other_text'] == []
    assert reward.ocr_label({'main_title': ['BAKERY'], 'subtitle': ['Fresh daily']}) == lab
    with pytest.raises(ValueError, match='unknown OCR keys'):
        reward.ocr_label({'title': ['x']})
    assert reward.parse_score('Score: 7/10, good') == 7.0
    assert reward.parse_score('I would say 10.') == 10.0
    assert reward.parse_score('8') == 8.0
    assert math.isnan(reward.parse_score('no idea')) and math.isnan(reward.parse_score('3.5 stars'))
    model, proc = reward.load_vlm(vlm_dir('qwen3'))
    for answer, want in (('7', 7.0), ('a', float('nan'))):         # a generation config that can only say `answer`
        only = proc.tokenizer.convert_tokens_to_ids(answer)
        model.generation_config.update(eos_token_id=only, pad_token_id=0,
                                       suppress_tokens=[i for i in range(len(proc.tokenizer)) if i != only])
        s, answers = reward.infer_score(model, proc, [_img(0), _img(1)], ['a dog', 'a cat'], max_new_tokens=4)
        assert answers == [answer] * 2 and torch.equal(s.isnan(), torch.tensor([math.isnan(want)] * 2))
        assert math.isnan(want) or s.tolist() == [want] * 2


def test_reward_logits_chunking_is_exact(vlm_dir, monkeypatch):
    model, proc = reward.load_vlm(vlm_dir('qwen3'))
    ims, labels = [_img(1), _img(2)], ['a red dog and a blue cat', 'hello world']
    whole = reward.promptecho_reward(model, proc, ims, labels)
    monkeypatch.setattr(reward, 'LOGITS_CHUNK', 3)                # 3 label positions per lm_head call
    assert torch.allclose(reward.promptecho_reward(model, proc, ims, labels), whole, atol=1e-6)


def test_write_json_is_strict_json(tmp_path):
    # NaN / inf (e.g. an agreement with no pairs) become null, which strict parsers of other tools accept
    reward.write_json({'agreement': float('nan'), 'x': [1.0, float('inf')], 'n': {'y': 2}}, str(tmp_path / 's.json'))
    def bad(c):
        raise ValueError(f"s.json holds {c}")
    assert json.load(open(tmp_path / 's.json'), parse_constant=bad) == {'agreement': None, 'x': [1.0, None], 'n': {'y': 2}}
    assert not os.path.exists(tmp_path / 's.json.tmp')
