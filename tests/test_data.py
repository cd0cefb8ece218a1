"""Preference data pipeline: sources, chat template, truncation, collators, bad input, skip_invalid."""
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from drdo.data import (
    EmptyDatasetError,
    InvalidExampleError,
    MissingFieldError,
    PreferenceCollator,
    SFTCollator,
    encode_prompt,
    load_preference_dataset,
    load_prompts,
    render_prompt,
    render_response,
)
from drdo.tokenizer import build_byte_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
EOS, PAD = 258, 256
USER, ASSISTANT, END, SYSTEM = 260, 261, 262, 259


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def b(text: str) -> list[int]:
    """Byte tokenizer ids of a plain string: its UTF-8 bytes."""
    return list(text.encode("utf-8"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair(prompt="P", chosen="good", rejected="bad", **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def msgs(*contents, role="assistant"):
    return [{"role": role, "content": c} for c in contents]


# ----------------------------------------------------------------------------- sources


def test_jsonl_fixture_strings_oracle_and_ref(tok):
    ds = load_preference_dataset(FIXTURES / "prefs.jsonl", tok)
    rows = [json.loads(line) for line in (FIXTURES / "prefs.jsonl").read_text().splitlines()]
    assert len(ds) == 4 and ds.num_oracles == 1 and ds.has_ref and ds.dropped == {}
    assert ds.source.endswith("prefs.jsonl")
    for i, row in enumerate(rows):
        item = ds[i]
        p = b(row["prompt"])
        for side in ("chosen", "rejected"):
            r = b(row[side]) + [EOS]
            assert item[f"{side}_input_ids"] == p + r
            assert item[f"{side}_labels"] == [-100] * len(p) + r
            assert item[f"oracle_{side}"] == row[f"oracle_{side}"]
            assert item[f"ref_{side}_logps"] == row[f"ref_{side}_logps"]
        assert item["row"] == i
        assert ds.raw[i] == row


def test_json_fixture_chat_template_path(tok):
    ds = load_preference_dataset(FIXTURES / "prefs_chat.json", tok)
    assert len(ds) == 2 and ds.num_oracles == 3 and not ds.has_ref
    item = ds[0]
    prompt = [SYSTEM] + b("Be brief.") + [END, USER] + b("Capital of France?") + [END, ASSISTANT]
    chosen = b("Paris.") + [END, EOS]
    rejected = b("Lyon, I think.") + [END, EOS]
    assert item["chosen_input_ids"] == prompt + chosen
    assert item["chosen_labels"] == [-100] * len(prompt) + chosen
    assert item["rejected_input_ids"] == prompt + rejected
    assert item["rejected_labels"] == [-100] * len(prompt) + rejected
    assert item["oracle_chosen"] == [1.0, 1.5, 0.5] and item["oracle_rejected"] == [-1.0, 0.0, -0.5]
    # multi-turn prompt: the earlier assistant turn belongs to the (masked) prompt
    second = ds[1]
    n_prompt = sum(1 for t in second["chosen_labels"] if t == -100)
    assert tok.decode(second["chosen_input_ids"][:n_prompt]) == (
        "<|user|>hi<|end|><|assistant|>hello<|end|><|user|>how are you?<|end|><|assistant|>")


def test_parquet_jsonl_and_list_give_identical_items(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "prefs.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prefs.parquet")
    from_parquet = load_preference_dataset(tmp_path / "prefs.parquet", tok)
    from_jsonl = load_preference_dataset(str(FIXTURES / "prefs.jsonl"), tok)
    from_list = load_preference_dataset(rows, tok)
    assert from_list.source == "<list>"
    for i in range(len(rows)):
        assert from_parquet[i] == from_jsonl[i] == from_list[i]


def test_local_split_slice(tok):
    ds = load_preference_dataset(FIXTURES / "prefs.jsonl", tok, split="train[:2]")
    assert len(ds) == 2


def test_missing_file_and_bad_suffix(tok, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_preference_dataset(tmp_path / "nope.jsonl", tok)
    (tmp_path / "data.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_preference_dataset(tmp_path / "data.csv", tok)


def test_load_prompts(tok, tmp_path):
    assert load_prompts(FIXTURES / "prefs.jsonl")[:2] == ["Q: 2+2?\nA:", "Say hi in French."]
    chat = load_prompts(FIXTURES / "prefs_chat.json")
    assert chat[0][1] == {"role": "user", "content": "Capital of France?"}
    with pytest.raises(InvalidExampleError, match=r"bad\.jsonl: line 2: missing field 'prompt'"):
        load_prompts(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"chosen": "b"}]))


def test_render_helpers(tok):
    assert render_prompt(tok, "plain") == "plain"
    assert render_response(tok, "plain", " resp") == " resp"
    prompt = msgs("hi", role="user")
    assert render_prompt(tok, prompt) == "<|user|>hi<|end|><|assistant|>"
    assert render_response(tok, prompt, msgs("yo")) == "yo<|end|>"


def test_chat_data_without_chat_template_is_a_clear_error(tok):
    plain = build_byte_tokenizer()
    plain.chat_template = None
    rows = [pair(msgs("hi", role="user"), msgs("a"), msgs("b"))]
    with pytest.raises(ValueError, match="no chat_template"):
        load_preference_dataset(rows, plain, skip_invalid=True)


def test_string_prompt_gets_the_tokenizers_bos(tmp_path):
    """A tokenizer whose post-processor adds BOS gets it in front of string prompts (not of responses)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from drdo.tokenizer import _build_backend

    backend = _build_backend()
    backend.post_processor = TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 257)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>",
                                       pad_token="<|pad|>")
    item = load_preference_dataset([pair("ab", "c", "d")], with_bos)[0]
    assert item["chosen_input_ids"] == [257, 97, 98, 99, EOS]
    assert item["chosen_labels"] == [-100, -100, -100, 99, EOS]
    assert encode_prompt(with_bos, "ab") == [257, 97, 98] and encode_prompt(with_bos, "ab", 1) == [98]


def test_encode_prompt_matches_the_dataset(tok):
    for name in ("prefs.jsonl", "prefs_chat.json"):
        ds = load_preference_dataset(FIXTURES / name, tok)
        for i in range(len(ds)):
            n_prompt = ds[i]["chosen_labels"].count(-100)  # response labels are never -100
            assert encode_prompt(tok, ds.raw[i]["prompt"]) == ds[i]["chosen_input_ids"][:n_prompt]


# ----------------------------------------------------------------------------- truncation policy


def test_truncation_prompt_left_then_response_tail(tok):
    row = pair("abcdefgh", "xy", "0123456789")
    item = load_preference_dataset([row], tok, max_length=10, max_prompt_length=3)[0]
    # prompt keeps its last 3 tokens; chosen fits with EOS (3 + 3 <= 10)
    assert item["chosen_input_ids"] == b("fgh") + b("xy") + [EOS]
    # rejected: 3 + 11 > 10 -> keep the first 7 response tokens, EOS is cut
    assert item["rejected_input_ids"] == b("fgh") + b("0123456")
    assert item["rejected_labels"] == [-100] * 3 + b("0123456")


def test_truncation_eos_kept_only_if_it_fits(tok):
    exact = load_preference_dataset([pair("ab", "cde", "z")], tok, max_length=6, max_prompt_length=4)[0]
    assert exact["chosen_input_ids"] == b("abcde") + [EOS]  # 2 + 3 + EOS == 6: all kept
    short = load_preference_dataset([pair("ab", "cde", "z")], tok, max_length=5, max_prompt_length=4)[0]
    assert short["chosen_input_ids"] == b("abcde")  # one short: EOS goes first
    assert short["rejected_input_ids"] == b("abz") + [EOS]


def test_truncation_short_prompt_untouched(tok):
    item = load_preference_dataset([pair("abc", "d", "e")], tok, max_length=8, max_prompt_length=3)[0]
    assert item["chosen_input_ids"] == b("abcd") + [EOS]


def test_truncation_leaving_no_response_token_is_invalid(tok, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [pair("ab", "c", "d"), pair("abcdefgh", "c", "d")])
    with pytest.raises(InvalidExampleError, match=r"long\.jsonl: line 2: the chosen response has no token left") as e:
        load_preference_dataset(path, tok, max_length=6, max_prompt_length=6)
    assert e.value.reason == "no tokens after truncation" and e.value.row == 1
    # one token of room: the first response token survives, without EOS
    item = load_preference_dataset([pair("abcdefgh", "cd", "e")], tok, max_length=6, max_prompt_length=5)[0]
    assert item["chosen_input_ids"] == b("defghc") and item["chosen_labels"] == [-100] * 5 + b("c")


def test_empty_prompt_first_response_token_is_not_scored(tok):
    ok = load_preference_dataset([pair("", "ab", "c")], tok, max_length=2)[0]
    assert ok["chosen_input_ids"] == b("ab")  # 'b' is predicted from 'a'
    with pytest.raises(InvalidExampleError, match="no token left"):
        load_preference_dataset([pair("", "ab", "c")], tok, max_length=1)


def test_bad_length_arguments(tok):
    with pytest.raises(ValueError, match="max_length"):
        load_preference_dataset([pair()], tok, max_length=0)
    with pytest.raises(ValueError, match="max_prompt_length"):
        load_preference_dataset([pair()], tok, max_prompt_length=0)


# ----------------------------------------------------------------------------- collators


def _expected_batch(seqs: list[list[int]], labels: list[list[int]], length: int):
    """Explicit construction of padded ids / mask / aligned labels."""
    ids = [[PAD] * length for _ in seqs]
    mask = [[0] * length for _ in seqs]
    aligned = [[-100] * length for _ in seqs]
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        for t in range(len(s)):
            ids[i][t], mask[i][t] = s[t], 1
            if t + 1 < len(s) and lab[t + 1] != -100:
                aligned[i][t] = s[t + 1]
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(aligned)


@pytest.mark.parametrize("multiple", [None, 8])
def test_preference_collator_matches_explicit_construction(tok, multiple):
    ds = load_preference_dataset(FIXTURES / "prefs.jsonl", tok)
    items = [ds[i] for i in range(len(ds))]
    batch = PreferenceCollator(tok.pad_token_id, pad_to_multiple_of=multiple)(items)
    seqs = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
    labs = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    length = max(map(len, seqs))
    if multiple:
        length = -(-length // multiple) * multiple
        assert length % multiple == 0
    ids, mask, aligned = _expected_batch(seqs, labs, length)
    assert batch["input_ids"].shape == (8, length) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["input_ids"], ids)
    assert torch.equal(batch["attention_mask"], mask)
    assert torch.equal(batch["labels"], aligned)
    assert (batch["labels"][:, -1] == -100).all()
    assert torch.equal(batch["rows"], torch.tensor([0, 1, 2, 3]))
    oracle = [it["oracle_chosen"] for it in items] + [it["oracle_rejected"] for it in items]
    assert batch["oracle_rewards"].dtype == torch.float32
    assert torch.equal(batch["oracle_rewards"], torch.tensor(oracle))
    ref = [it["ref_chosen_logps"] for it in items] + [it["ref_rejected_logps"] for it in items]
    assert torch.equal(batch["ref_logps"], torch.tensor(ref))


def test_aligned_labels_give_response_logprob(tok):
    """sequence_logprobs on collated labels == explicit sum over response tokens of log p(y_t | y_<t)."""
    from drdo.losses import sequence_logprobs

    ds = load_preference_dataset(FIXTURES / "prefs.jsonl", tok)
    items = [ds[0], ds[3]]
    batch = PreferenceCollator(tok.pad_token_id)(items)
    logits = torch.randn(*batch["input_ids"].shape, 264, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    logps, n_tokens = sequence_logprobs(logits, batch["labels"])
    seqs = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
    labs = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        positions = [t for t in range(1, len(s)) if lab[t] != -100]
        expected = sum(torch.log_softmax(logits[i, t - 1], -1)[s[t]].item() for t in positions)
        assert n_tokens[i].item() == len(positions)
        assert math.isclose(logps[i].item(), expected, rel_tol=1e-12, abs_tol=1e-12)
    # the row with an empty prompt: its first response token is not predicted
    assert n_tokens[1].item() == len(b("no prompt here")) + 1 - 1


def test_oracle_ensemble_k3_collates_to_k_by_2b(tok):
    ds = load_preference_dataset(FIXTURES / "prefs_chat.json", tok)
    batch = PreferenceCollator(tok.pad_token_id)([ds[0], ds[1]])
    assert batch["oracle_rewards"].shape == (3, 4) and batch["oracle_rewards"].dtype == torch.float32
    expected = torch.tensor([[1.0, 0.5, -1.0, 0.0], [1.5, 0.25, 0.0, 0.5], [0.5, 0.75, -0.5, -0.25]])
    assert torch.equal(batch["oracle_rewards"], expected)
    assert "ref_logps" not in batch


def test_oracle_list_of_one_is_k1(tok):
    ds = load_preference_dataset([pair(oracle_chosen=[2.0], oracle_rejected=[1.0]),
                                  pair(oracle_chosen=3, oracle_rejected=0)], tok)
    assert ds.num_oracles == 1 and ds[0]["oracle_chosen"] == 2.0 and ds[1]["oracle_rejected"] == 0.0
    batch = PreferenceCollator(tok.pad_token_id)([ds[0], ds[1]])
    assert torch.equal(batch["oracle_rewards"], torch.tensor([2.0, 3.0, 1.0, 0.0]))


def test_sft_collator_and_dataloader(tok):
    ds = load_preference_dataset(FIXTURES / "prefs.jsonl", tok)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=SFTCollator(tok.pad_token_id))
    batch = next(iter(loader))
    items = [ds[i] for i in range(3)]
    seqs, labs = [it["chosen_input_ids"] for it in items], [it["chosen_labels"] for it in items]
    ids, mask, aligned = _expected_batch(seqs, labs, max(map(len, seqs)))
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert torch.equal(batch["labels"], aligned) and torch.equal(batch["rows"], torch.tensor([0, 1, 2]))
    pref = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=PreferenceCollator(PAD))))
    assert pref["input_ids"].shape[0] == 4 and pref["oracle_rewards"].shape == (4,)


# ----------------------------------------------------------------------------- bad input

GOOD = pair("Prompt", "fine", "worse")
BAD_ROWS = [
    ({"chosen": "a", "rejected": "b"}, "missing field", "missing field 'prompt'"),
    ({"prompt": "p", "rejected": "b"}, "missing field", "missing field 'chosen'"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "missing field", "missing field 'rejected'"),
    (pair(chosen=5), "wrong type", "'chosen' must be a string or a list of messages, got int"),
    (pair(prompt={"text": "p"}), "wrong type", "'prompt' must be a string"),
    (pair(msgs("p", role="user"), "a", "b"), "mixed formats", "all strings or all lists"),
    (pair(msgs("p", role="user"), [{"role": "assistant"}], msgs("b")), "malformed messages",
     r"chosen\[0\] has no string 'content'"),
    (pair(msgs("p", role="user"), msgs("a"), [{"role": 3, "content": "b"}]), "malformed messages",
     r"rejected\[0\] has no string 'role'"),
    (pair(msgs("p", role="user"), msgs("a"), ["just text"]), "malformed messages", "not a message dict"),
    (pair([], msgs("a"), msgs("b")), "malformed messages", "'prompt' is an empty list"),
    (pair(chosen=""), "empty response", "'chosen' is an empty response"),
    (pair(rejected="  \n\t"), "empty response", "'rejected' is an empty response"),
    (pair(msgs("p", role="user"), msgs(""), msgs("b")), "empty response", "'chosen' is an empty response"),
    (pair(oracle_chosen=float("nan"), oracle_rejected=1.0), "non-finite score", "'oracle_chosen' holds a non-finite"),
    (pair(oracle_chosen=1.0, oracle_rejected=float("inf")), "non-finite score", "'oracle_rejected'"),
    (pair(oracle_chosen=[1.0, float("-inf")], oracle_rejected=[0.0, 0.0]), "non-finite score", "non-finite"),
    (pair(oracle_chosen="high", oracle_rejected=1.0), "wrong type", "must be a number"),
    (pair(oracle_chosen=True, oracle_rejected=1.0), "wrong type", "must be a number"),
    (pair(oracle_chosen=1.0), "missing field", "missing field 'oracle_rejected'"),
    (pair(oracle_chosen=[1.0, 2.0], oracle_rejected=[1.0]), "inconsistent K", "2 scores but oracle_rejected has 1"),
    (pair(ref_chosen_logps=float("nan"), ref_rejected_logps=-1.0), "non-finite score", "'ref_chosen_logps'"),
    (pair(ref_chosen_logps=-1.0, ref_rejected_logps=2.5), "positive log-prob", "not a log-probability"),
]


def _good_like(bad: dict) -> dict:
    """A valid row carrying the same optional score fields (same K) as ``bad``."""
    good = dict(GOOD)
    oracle = bad.get("oracle_chosen")
    if any(f in bad for f in ("oracle_chosen", "oracle_rejected")):
        k = len(oracle) if isinstance(oracle, list) else 1
        good["oracle_chosen"] = good["oracle_rejected"] = [0.5] * k if k > 1 else 0.5
    if any(f in bad for f in ("ref_chosen_logps", "ref_rejected_logps")):
        good["ref_chosen_logps"] = good["ref_rejected_logps"] = -1.0
    return good


@pytest.mark.parametrize("bad,reason,message", BAD_ROWS, ids=[f"{r[1]}-{i}" for i, r in enumerate(BAD_ROWS)])
def test_bad_row_names_file_row_and_problem(tok, tmp_path, bad, reason, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [_good_like(bad), bad])
    with pytest.raises(InvalidExampleError, match=message) as err:
        load_preference_dataset(path, tok)
    assert str(err.value).startswith(f"{path}: line 2: ")
    assert (err.value.row, err.value.reason) == (1, reason)
    # skip_invalid drops exactly that row and keeps the good one
    ds = load_preference_dataset(path, tok, skip_invalid=True)
    assert len(ds) == 1 and ds[0]["row"] == 0 and ds.dropped == {reason: 1}


def test_inconsistent_k_across_rows(tok, tmp_path):
    rows = [pair(oracle_chosen=[1.0, 2.0], oracle_rejected=[0.0, 1.0]),
            pair(oracle_chosen=[1.0, 2.0, 3.0], oracle_rejected=[0.0, 1.0, 2.0])]
    with pytest.raises(InvalidExampleError, match=r"k\.jsonl: line 2: 3 oracle scores per response but line 1 has 2"):
        load_preference_dataset(write_jsonl(tmp_path / "k.jsonl", rows), tok)


@pytest.mark.parametrize("fields", [("oracle_chosen", "oracle_rejected"), ("ref_chosen_logps", "ref_rejected_logps")])
def test_row_without_scores_that_others_have(tok, fields):
    rows = [pair(**{fields[0]: -1.0, fields[1]: -2.0}), pair()]
    with pytest.raises(InvalidExampleError,
                       match=f"row 2 \\(1-based\\): missing field '{fields[0]}' \\(other rows have") as err:
        load_preference_dataset(rows, tok)
    assert err.value.source == "<list>"


def test_invalid_json_line(tok, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n{not json\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(InvalidExampleError, match=r"broken\.jsonl: line 3: not valid JSON"):
        load_preference_dataset(path, tok)
    ds = load_preference_dataset(path, tok, skip_invalid=True)
    assert [ds[i]["row"] for i in range(len(ds))] == [0, 2] and ds.dropped == {"invalid JSON": 1}


def test_non_dict_row_in_list(tok):
    with pytest.raises(InvalidExampleError, match=r"<list>: row 1 \(1-based\): a row must be a dict, got str"):
        load_preference_dataset(["prompt chosen rejected"], tok)


def test_skip_invalid_counts_and_one_summary_line(tok, tmp_path, caplog):
    rows = [GOOD, pair(chosen=""), {"prompt": "p"}, pair(rejected=""), pair("x" * 20, "ok", "ok"), GOOD]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="drdo.data"):
        ds = load_preference_dataset(path, tok, skip_invalid=True, max_length=8, max_prompt_length=8)
    assert len(ds) == 2 and [ds[i]["row"] for i in range(2)] == [0, 5]
    assert ds.dropped == {"empty response": 2, "missing field": 1, "no tokens after truncation": 1}
    assert [r for r, _ in ds.dropped_rows] == [1, 2, 3, 4]
    assert ds.raw[1] == GOOD and len(ds.raw) == 2
    records = [r for r in caplog.records if r.name == "drdo.data"]
    assert len(records) == 1
    line = records[0].getMessage()
    assert "\n" not in line and "dropped 4 of 6 rows" in line and str(path) in line
    assert "2 empty response" in line and "1 missing field" in line and "1 no tokens after truncation" in line


def test_no_warning_when_nothing_dropped(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="drdo.data"):
        load_preference_dataset([GOOD], tok, skip_invalid=True)
    assert not [r for r in caplog.records if r.name == "drdo.data"]


def test_empty_sources(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EmptyDatasetError, match="no rows"):
        load_preference_dataset(empty, tok)
    with pytest.raises(EmptyDatasetError, match="no rows"):
        load_preference_dataset([], tok)
    all_bad = write_jsonl(tmp_path / "allbad.jsonl", [pair(chosen=""), pair(rejected="")])
    with pytest.raises(EmptyDatasetError, match="no usable preference pair.*dropped 2 of 2 rows"):
        load_preference_dataset(all_bad, tok, skip_invalid=True)


def test_require_oracle_and_ref(tok):
    with pytest.raises(MissingFieldError, match="drdo oracle score"):
        load_preference_dataset([GOOD], tok, require_oracle=True)
    with pytest.raises(MissingFieldError, match="drdo reflogps"):
        load_preference_dataset([GOOD], tok, require_ref=True)
    ds = load_preference_dataset(FIXTURES / "prefs.jsonl", tok, require_oracle=True, require_ref=True)
    assert ds.num_oracles == 1 and ds.has_ref


def test_broken_json_array_file(tok, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": ')
    with pytest.raises(ValueError, match=r"broken\.json: line 2: not valid JSON"):
        load_preference_dataset(path, tok)


def test_datasets_object_and_saved_directory(tok, tmp_path):
    import datasets

    rows = [json.loads(line) for line in (FIXTURES / "prefs.jsonl").read_text().splitlines()]
    table = datasets.Dataset.from_list(rows)
    from_object = load_preference_dataset(table, tok)
    table.save_to_disk(str(tmp_path / "saved"))
    from_dir = load_preference_dataset(tmp_path / "saved", tok)
    assert len(from_object) == len(from_dir) == 4
    assert from_object[2] == from_dir[2] == load_preference_dataset(rows, tok)[2]


def test_chat_template_that_does_not_prefix_is_a_row_error():
    odd = build_byte_tokenizer()
    # the generation prompt differs from how an assistant turn renders: no clean prompt/response split
    odd.chat_template = ("{% for m in messages %}{{ m['role'] + ':' + m['content'] + ';' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant>' }}{% endif %}")
    rows = [pair(msgs("hi", role="user"), msgs("a"), msgs("b"))]
    with pytest.raises(InvalidExampleError, match=r"row 1 \(1-based\): chat template failed") as err:
        load_preference_dataset(rows, odd)
    assert err.value.reason == "chat template"
