"""The OCR reward with real PP-OCR weights (rapidocr-onnxruntime's wheel): real rendered text images."""
import os

import numpy as np
import pytest
import torch

from densegrpo_fast.rewards import CombinedReward, RewardError
from densegrpo_fast.rewards.ocr import check_prompts, edit_distance, ocr_score


def render(text: str, size: int = 512) -> torch.Tensor:
    """Dark text on a light background, DejaVu Sans (shipped with matplotlib), as a (3, size, size) image in [0,1]."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.truetype(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf",
                                           "DejaVuSans.ttf"), size // 10)
    im = Image.new("RGB", (size, size), (235, 230, 220))
    d = ImageDraw.Draw(im)
    d.text(((size - d.textlength(text, font=font)) / 2, size * 0.45), text, fill=(20, 20, 30), font=font)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0


def test_score_rule_by_hand():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert ocr_score("Welcome to the Spring Collection 2024!", "Spring Collection") == 1.0  # containment
    assert ocr_score("Sprng Colection", "Spring Collection") == pytest.approx(1 - 2 / 16)  # 2 edits, 16 chars
    assert ocr_score("", "open") == 0.0 and ocr_score("zzzzzzzzzz", "open") == 0.0  # bounded at 0


@pytest.mark.slow
def test_real_ocr_on_rendered_text():
    r = CombinedReward({"ocr": 1.0})
    imgs = torch.stack([render("Forever Yours"), render("Step Goal"), torch.full((3, 512, 512), 0.9)])
    prompts = ['a ring engraved "Forever Yours"', 'a watch showing "Harbor Lights"', 'a blank sign saying "Open"']
    scores, _ = r(imgs, prompts)
    assert scores[0] >= 0.9                  # the right text
    assert scores[1] <= 0.3                  # a different word
    assert scores[2] == 0.0                  # a blank image


def test_prompts_without_quotes_are_rejected_at_load_time():
    ocr = CombinedReward({"ocr": 1.0})
    ocr.check_prompts(['a sign "open"'], "prompts")
    CombinedReward({"jpeg_compressibility": 1.0}).check_prompts(["no quotes needed"], "prompts")
    with pytest.raises(ValueError, match=r"prompts \(x.txt\): prompt 1 \('a plain sign'\) has no text between"):
        ocr.check_prompts(['a sign "open"', "a plain sign"], "prompts (x.txt)")
    check_prompts(['a sign "open"'], "prompts")  # the function the ocr reward attaches
    with pytest.raises(RewardError, match="reward 'ocr' failed"):
        CombinedReward({"ocr": 1.0})(torch.zeros(1, 3, 32, 32), ["no quotes"])
