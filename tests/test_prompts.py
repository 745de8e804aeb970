"""Prompt files in the formats of Flow-GRPO's dataset/ folder (samples with their MIT licence in tests/data)."""
import os

import pytest

from densegrpo_fast.config import PromptsConfig
from densegrpo_fast.prompts import load_prompts, load_records, ocr_target
from conftest import ROOT

DATA = os.path.join(ROOT, "tests", "data", "flow_grpo")


def test_three_formats_load():
    pick = load_prompts(PromptsConfig(source="file", path=os.path.join(DATA, "pickscore_sample.txt")))
    assert len(pick) == 20 and pick[0].startswith("Beautiful woman")
    ge = load_records(PromptsConfig(source="file", path=os.path.join(DATA, "geneval_sample.jsonl")))
    assert len(ge) == 20 and ge[0]["prompt"] == "a photo of two wine glasses" and ge[0]["tag"] == "counting"
    assert ge[0]["include"] == [{"class": "wine glass", "count": 2}]
    ocr = load_records(PromptsConfig(source="file", path=os.path.join(DATA, "ocr_sample.txt"), format="ocr"))
    assert len(ocr) == 20 and ocr[0]["target"] == "Spring Collection 2024"
    assert ocr[1]["target"] == "Step Goal Achieved"


def test_bad_files_name_the_line(tmp_path):
    bad = tmp_path / "ocr.txt"
    bad.write_text('a sign saying "open"\na sign with no quoted text\n')
    with pytest.raises(ValueError, match=r"ocr.txt' line 2 has no text between double quotes"):
        load_prompts(PromptsConfig(source="file", path=str(bad), format="ocr"))
    js = tmp_path / "meta.jsonl"
    js.write_text('{"prompt": "a cat"}\n{"tag": "x"}\n')
    with pytest.raises(ValueError, match=r"meta.jsonl' line 2 has no \"prompt\" string"):
        load_prompts(PromptsConfig(source="file", path=str(js)))
    js.write_text('{"prompt": "a cat"}\nnot json\n')
    with pytest.raises(ValueError, match=r"line 2 is not JSON"):
        load_prompts(PromptsConfig(source="file", path=str(js)))
    with pytest.raises(FileNotFoundError, match="prompts.path: prompt file"):
        load_prompts(PromptsConfig(source="file", path=str(tmp_path / "none.txt")))
    with pytest.raises(ValueError, match="no text between double quotes"):
        ocr_target("nothing quoted")
