"""Translation-prompt calibration (calibration.translation, after Kim et al. 2024): prompt text, the held-out
split of parallel files, seeding, recipe errors, the contrast statistic and a tiny-model prune with it."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import NTREX, TOKENIZERS, ntrex_lines, require_shared, tiny_checkpoint, tiny_model
from test_prune_layerwise import loaded_of

from converter.arch import Arch
from converter.calibrate import (
    TEXT,
    TRANSLATION,
    CalibrationResult,
    calibrate,
    language_name,
    read_parallel,
    split_heldout,
    translation_prompt,
)
from converter.cli import main
from converter.errors import DataError
from converter.prune import prune
from converter.prune.masks import unstructured_mask
from converter.prune.wanda import ActivationNorms, contrast_norms, wanda_scores
from converter.recipe import CalibrationConfig, LanguageSpec, PruneConfig, TranslationConfig

EN = [f"The cat number {i} sleeps." for i in range(10)]
KO = [f"고양이 {i}번이 잔다." for i in range(10)]


def files(tmp: Path, en: list[str] = EN, ko: list[str] = KO) -> dict[str, str]:
    (tmp / "en.txt").write_text("\n".join(en) + "\n", encoding="utf-8")
    (tmp / "ko.txt").write_text("\n".join(ko) + "\n", encoding="utf-8")
    return {"en": str(tmp / "en.txt"), "ko": str(tmp / "ko.txt")}


def resolve(patterns: list[str], what: str) -> list[Path]:
    return [Path(p) for p in patterns]


def tokenizer(name: str = "gemma3"):
    require_shared()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


def calib_cfg(tr: dict, **over) -> CalibrationConfig:
    return CalibrationConfig(**{"num_samples": 8, "seq_len": 48, "heldout_fraction": 0.2, **over, "translation": tr})


def decoded_lines(tok, window: torch.Tensor) -> tuple[str, list[str]]:
    """The window's text (BOS dropped) and its complete lines (the last, possibly cut, line left out)."""
    ids = window.tolist()
    if ids and ids[0] == tok.bos_token_id:
        ids = ids[1:]
    text = tok.decode(ids)
    return text, text.split("\n")[:-1]


# ------------------------------------------------------------------------------------------------ prompts
def test_prompt_text_and_language_names():
    assert language_name("ko") == "Korean" and language_name("en") == "English"
    assert language_name("uk") == "Ukrainian"
    pairs = [("Hello.", "안녕."), ("Thanks.", "고마워.")]
    assert translation_prompt(pairs, "English", "Korean") == (
        "English: Hello.\nKorean: 안녕.\nEnglish: Thanks.\nKorean: 고마워.\n"
    )


def test_windows_are_bos_then_blank_line_separated_prompts_of_aligned_pairs(tmp_path):
    """Every translation window: BOS, then k-shot prompts separated by a blank line, starting at a prompt; each
    prompt's lines alternate '<Source>: en_i' / '<Target>: ko_i' with i the same line of both files."""
    tok = tokenizer("gemma3")
    tr = {"files": files(tmp_path), "directions": ["en-ko", "ko-en"], "shots": 2, "share": 1.0}
    lang = LanguageSpec(code="ko", calibrate=False, sources=[str(tmp_path / "ko.txt")])
    res = calibrate(tok, [lang], calib_cfg(tr, seq_len=96), 0, resolve)
    assert res.windows.shape == (8, 96)
    assert res.window_kinds == [TRANSLATION] * 8
    assert res.window_langs == ["ko"] * 4 + ["en"] * 4  # the target language, directions split evenly
    assert res.summary()["window_kinds"] == {TEXT: 0, TRANSLATION: 8}
    assert res.summary()["languages"]["ko"]["translation_windows"] == 4
    calib_idx = range(8)  # 10 lines, heldout_fraction 0.2: the last 2 are held out
    for w, target in zip(res.windows, res.window_langs):
        assert w[0].item() == tok.bos_token_id
        text, lines = decoded_lines(tok, w)
        src, tgt = ("English", "Korean") if target == "ko" else ("Korean", "English")
        assert text.startswith(f"{src}: ")
        prompts = text.split("\n\n")
        assert len(prompts) >= 2  # 96 tokens hold more than one 3-pair prompt
        for prompt in prompts[:-1]:  # the last one may be cut
            rows = prompt.split("\n")
            assert len(rows) == 2 * 3
            picked = []
            for s_line in rows[0::2]:
                i = (EN if src == "English" else KO).index(s_line.removeprefix(f"{src}: "))
                picked.append(i)
                assert i in calib_idx
            pairs = [(EN[i], KO[i]) if src == "English" else (KO[i], EN[i]) for i in picked]
            assert prompt + "\n" == translation_prompt(pairs, src, tgt)
            assert len(set(picked)) == 3  # shots + 1 distinct pairs per prompt


def test_without_bos_the_window_starts_with_the_prompt(tmp_path):
    tok = tokenizer("gpt2")  # GPT-2 prepends no BOS
    tr = {"files": files(tmp_path), "directions": ["en-ko"], "shots": 0, "share": 1.0}
    lang = LanguageSpec(code="ko", calibrate=False, sources=[str(tmp_path / "ko.txt")])
    res = calibrate(tok, [lang], calib_cfg(tr, num_samples=2, seq_len=16), 0, resolve)
    for w in res.windows:
        assert tok.decode(w.tolist()).startswith("English: The cat number ")


# ------------------------------------------------------------------------------------------------ held out
def test_heldout_lines_never_reach_a_window_and_match_the_languages_split():
    """Real NTREX en/ko: the parallel files' held-out tail is exactly what split_heldout holds out of the same
    file as a language source, and no window (text or translation) holds a held-out line."""
    tok = tokenizer("gemma3")
    en_file, ko_file = NTREX / "newstest2019-ref.eng-US.txt", NTREX / "newstest2019-ref.kor.txt"
    ko = ntrex_lines("ko")
    tr = TranslationConfig(files={"en": str(en_file), "ko": str(ko_file)}, directions=["en-ko", "ko-en"], shots=1)
    par = read_parallel(tr, 0.1, resolve)
    _, held_ko = split_heldout([line.strip() for line in ko if line.strip()], 0.1)
    assert par.heldout == list(range(len(ko) - len(held_ko), len(ko)))
    assert [par.lines["ko"][i] for i in par.heldout] == held_ko

    langs = [
        LanguageSpec(code="ko", sources=[str(ko_file)]),
        LanguageSpec(code="en", sources=[str(en_file)]),
    ]
    cfg = CalibrationConfig(num_samples=24, seq_len=96, heldout_fraction=0.1, translation=tr)
    res = calibrate(tok, langs, cfg, 0, resolve)
    assert res.window_kinds.count(TRANSLATION) == 12 and res.window_kinds.count(TEXT) == 12
    assert res.languages["ko"].heldout_docs == held_ko[:64]  # max_heldout_docs
    held = {par.lines[c][i] for c in ("en", "ko") for i in par.heldout}
    calib_lines = {par.lines[c][i] for c in ("en", "ko") for i in par.calib}
    names = {"English", "Korean"}
    for w, kind in zip(res.windows, res.window_kinds):
        text, lines = decoded_lines(tok, w)
        assert not any(h in text for h in held if len(h) > 20)
        if kind == TRANSLATION:
            for line in lines:
                if line:
                    name, _, sentence = line.partition(": ")
                    assert name in names and sentence in calib_lines and sentence not in held, line


def test_unequal_line_counts_name_both_files(tmp_path):
    paths = files(tmp_path, en=EN, ko=KO[:7])
    tr = TranslationConfig(files=paths, directions=["en-ko"])
    with pytest.raises(DataError) as err:
        read_parallel(tr, 0.1, resolve)
    assert err.value.exit_code == 2
    assert f"'{paths['en']}' has 10 lines but '{paths['ko']}' has 7" in str(err.value)
    assert "line-aligned" in str(err.value)


def test_too_few_pairs_for_the_shots(tmp_path):
    tr = TranslationConfig(files=files(tmp_path, en=EN[:4], ko=KO[:4]), directions=["en-ko"], shots=3)
    with pytest.raises(DataError, match="fewer than shots \\+ 1 = 4"):
        read_parallel(tr, 0.1, resolve)


def test_blank_lines_keep_alignment_and_are_never_paired(tmp_path):
    en = list(EN)
    ko = list(KO)
    en[2] = ""  # a blank line on one side: pair 2 is unusable, the others stay aligned
    par = read_parallel(TranslationConfig(files=files(tmp_path, en, ko), directions=["en-ko"]), 0.2, resolve)
    assert 2 not in par.calib and par.lines["ko"][3] == KO[3] and par.lines["en"][3] == EN[3]
    assert set(par.heldout) == {8, 9}


# ------------------------------------------------------------------------------------------------ seeding
def test_seeded_and_deterministic(tmp_path):
    tok = tokenizer("gpt2")
    tr = {"files": files(tmp_path), "directions": ["en-ko", "ko-en"], "shots": 1, "share": 0.5}
    langs = [LanguageSpec(code="ko", sources=[str(tmp_path / "ko.txt")])]
    a = calibrate(tok, langs, calib_cfg(tr), 0, resolve)
    b = calibrate(tok, langs, calib_cfg(tr), 0, resolve)
    c = calibrate(tok, langs, calib_cfg(tr), 1, resolve)
    assert a.windows.equal(b.windows) and a.window_kinds == b.window_kinds and a.window_langs == b.window_langs
    mt = [k == TRANSLATION for k in a.window_kinds]
    assert not a.windows[mt].equal(c.windows[mt])
    assert a.window_kinds == [TEXT] * 4 + [TRANSLATION] * 4 and a.window_langs == ["ko"] * 6 + ["en"] * 2
    summary = a.summary()
    assert summary["window_kinds"] == {TEXT: 4, TRANSLATION: 4}
    assert summary["translation"]["directions"] == ["en-ko", "ko-en"] and summary["translation"]["calib_pairs"] == 8


# ------------------------------------------------------------------------------------------------ recipe errors
def recipe(tmp: Path, translation: dict, **over) -> Path:
    require_shared()
    paths = files(tmp)
    ckpt = tmp / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = {
        "name": "t",
        "model": {"source": str(ckpt), "tokenizer": str(TOKENIZERS / "gemma3")},
        "languages": [{"code": "ko", "sources": [paths["ko"]]}],
        "calibration": {"translation": {"files": paths, **translation}},
        "output": {"dir": "out"},
        **over,
    }
    p = tmp / "r.yaml"
    p.write_text(yaml.safe_dump(r, allow_unicode=True))
    return p


def check_error(path: Path) -> str:
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_a_valid_translation_section_passes_check(tmp_path):
    result = CliRunner().invoke(main, ["check", str(recipe(tmp_path, {"directions": ["en-ko"], "contrast": True}))])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "translation,over,needle",
    [
        (
            {"directions": ["en-ko", "ko-en"]},
            {},
            "calibration.translation.directions has 'ko-en', but its target 'en' is not one of the recipe's "
            "languages (ko); add it to languages or drop the direction",
        ),
        (
            {"directions": ["en-uk"]},
            {},
            "'calibration.translation': direction 'en-uk' is not '<source>-<target>' with both languages among "
            "the keys of calibration.translation.files (en, ko); add the missing language's file",
        ),
        (
            {"directions": ["en-ko"], "contrast": True, "share": 1.0},
            {},
            "contrast compares translation windows with text windows, but share 1 leaves no text windows; set "
            "share strictly between 0 and 1",
        ),
        (
            {"directions": ["en-ko"], "contrast": True, "share": 0.9},
            {"calibration_num_samples": 4},
            "translation.contrast needs both translation and text windows, but translation.share 0.9 of "
            "num_samples 4 leaves 0 text windows",
        ),
        (
            {"directions": ["en-ko"], "contrast": True},
            {"prune": {"method": "sparsegpt"}},
            "calibration.translation.contrast rescales Wanda's activation norms, but prune.method is "
            "'sparsegpt'; set prune.method: wanda or contrast: false",
        ),
        ({"directions": ["en-ko"], "shots": -1}, {}, "'calibration.translation.shots'"),
        ({"directions": ["ko-ko"]}, {}, "direction 'ko-ko' translates a language into itself"),
    ],
    ids=["target-not-a-language", "language-without-file", "share-1", "no-text-windows", "sparsegpt", "shots", "self"],
)
def test_recipe_errors_exit_2_with_one_sentence(tmp_path, translation, over, needle):
    num = over.pop("calibration_num_samples", None)
    path = recipe(tmp_path, translation, **over)
    if num is not None:
        data = yaml.safe_load(path.read_text())
        data["calibration"]["num_samples"] = num
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert needle in check_error(path)


def test_unequal_line_counts_exit_2_on_run(tmp_path):
    """A misaligned pair of files fails `check` and the run's preflight, exit 2, naming both files."""
    ckpt = tiny_checkpoint(tmp_path / "tiny", "gpt2", "llama", 50257)
    path = recipe(tmp_path, {"directions": ["en-ko"]}, model={"source": str(ckpt)})
    (tmp_path / "ko.txt").write_text("\n".join(KO[:9]) + "\n", encoding="utf-8")
    want = f"'{tmp_path / 'en.txt'}' has 10 lines but '{tmp_path / 'ko.txt'}' has 9"
    assert want in check_error(path)  # `langconvert check` finds it before any weight is loaded
    result = CliRunner().invoke(main, [str(path), "-q"])
    assert result.exit_code == 2, result.output
    assert want in result.output


# ------------------------------------------------------------------------------------------------ contrast math
def test_contrast_norms_hand_worked():
    mt = ActivationNorms(4)
    mt.add_batch(torch.tensor([[2.0, 1.0, 0.0, 3.0], [2.0, -1.0, 0.0, -3.0]]))  # Σx² (8, 2, 0, 18), T 2
    text = ActivationNorms(4)
    text.add_batch(torch.tensor([[2.0, 4.0, 10.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))  # Σx² (4, 16, 100, 0), T 2
    text.add_batch(torch.zeros(2, 4))  # T 4: s_text = (1, 2, 5, 0)
    s = contrast_norms(mt.sq_sum, mt.tokens, text.sq_sum, text.tokens)
    # s_mt = (2, 1, 0, 3): 2·2/1, 1·1/2, 0, and 3·3 over the floor 1e-6·5
    assert torch.allclose(s, torch.tensor([4.0, 0.5, 0.0, 1.8e6], dtype=torch.float64), rtol=1e-12, atol=0)
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-1.0, 1.0, 1.0, 0.0]])
    score = wanda_scores(w, s.square())
    assert torch.allclose(score, torch.tensor([[4.0, 1.0, 0.0, 9e5], [4.0, 0.5, 0.0, 0.0]]), rtol=1e-6)
    # half of each row: row 0 keeps channels 0 and 3, row 1 channels 0 and 1
    assert unstructured_mask(score, 0.5).tolist() == [[True, False, False, True], [True, True, False, False]]


def test_contrast_norms_guards():
    zero = torch.zeros(3, dtype=torch.float64)
    assert contrast_norms(zero, 2, zero, 2).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="both kinds need tokens"):
        contrast_norms(zero, 0, zero, 2)
    with pytest.raises(ValueError, match="in_features"):
        contrast_norms(zero, 1, torch.zeros(4), 1)


# ------------------------------------------------------------------------------------------------ prune


def test_prune_with_contrast_uses_the_statistic_per_kind():
    """Layer 0's masks equal |W|·s_mt²/s_text masks from the dense model's activations split by window kind;
    batches of 3 over interleaved kinds put both kinds in one batch."""
    kinds = [TEXT, TRANSLATION, TEXT, TRANSLATION, TRANSLATION, TEXT]
    windows = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(0))
    calib = CalibrationResult(
        languages={}, windows=windows, window_langs=["ko"] * 6, window_kinds=kinds, contrast=True
    )
    model = tiny_model("gemma3_text")
    dense = copy.deepcopy(model)
    cfg = PruneConfig(method="wanda", sparsity=0.5, batch_size=3)
    res = prune(loaded_of(model), calib, cfg)
    assert abs(res.overall_sparsity - 0.5) < 0.02

    arch = Arch.of(dense)
    lins = arch.prunable_linears(arch.decoder_layers()[0])
    accs = {name: {k: ActivationNorms(lin.in_features) for k in (TEXT, TRANSLATION)} for name, lin in lins.items()}
    current = {"kind": TEXT}
    handles = [
        lin.register_forward_pre_hook(lambda _m, args, a=accs[name]: a[current["kind"]].add_batch(args[0]))
        for name, lin in lins.items()
    ]
    with torch.no_grad():
        for w, k in zip(windows, kinds):
            current["kind"] = k
            dense(input_ids=w[None], use_cache=False)
    for h in handles:
        h.remove()
    got = arch.prunable_linears(Arch.of(model).decoder_layers()[0])
    differs = False
    for name, lin in lins.items():
        a = accs[name]
        s = contrast_norms(a[TRANSLATION].sq_sum, a[TRANSLATION].tokens, a[TEXT].sq_sum, a[TEXT].tokens)
        expected = unstructured_mask(wanda_scores(lin.weight, s.square()), 0.5)
        assert torch.equal(got[name].weight != 0, expected), name
        plain = unstructured_mask(wanda_scores(lin.weight, a[TEXT].sq_sum + a[TRANSLATION].sq_sum), 0.5)
        differs |= not torch.equal(expected, plain)
    assert differs  # the contrast changes which weights go


def test_tiny_recipe_with_translation_contrast_runs_end_to_end(tmp_path):
    """The whole road on a tiny Gemma 3 with the real tokenizer and NTREX en/ko as calibration prompts."""
    require_shared()
    ckpt = tmp_path / "tiny-gemma3"
    tiny_model("gemma3_text", vocab_size=262_144).save_pretrained(ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / "gemma3" / f, ckpt / f)
    en, ko = NTREX / "newstest2019-ref.eng-US.txt", NTREX / "newstest2019-ref.kor.txt"
    r = {
        "name": "tiny-mt",
        "model": {"source": str(ckpt)},
        "languages": [{"code": "ko", "sources": [str(ko)]}, {"code": "en", "sources": [str(en)]}],
        "calibration": {
            "num_samples": 8,
            "seq_len": 32,
            "max_heldout_docs": 4,
            "translation": {"files": {"en": str(en), "ko": str(ko)}, "directions": ["en-ko", "ko-en"], "contrast": True},
        },
        "prune": {"method": "wanda", "sparsity": 0.5, "batch_size": 4},
        "vocab": {"enabled": False},
        "export": {"enabled": False},
        "validate": {"greedy_tokens": 0, "long_prompt_tokens": 0, "speed_prompts": 0, "eval_seq_len": 32},
        "output": {"dir": str(tmp_path / "dist")},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r, allow_unicode=True))
    result = CliRunner().invoke(main, [str(path), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    man = json.loads((tmp_path / "dist" / "tiny-mt" / "manifest.json").read_text())
    calibrated = man["stages"]["calibrate"]["metrics"]
    assert calibrated["window_kinds"] == {TEXT: 4, TRANSLATION: 4}
    assert calibrated["translation"]["contrast"] is True
    assert man["stages"]["prune"]["metrics"]["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
