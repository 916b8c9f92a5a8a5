"""experiments/texture.py's probe: one chunk after a history spoiled on purpose (blurred or dimmed).

The spoiling must do what its name says, the probe's "true" history must give exactly the chunk that --first makes
after the same true frames, and a spoiled history must reach the model."""

import json
import sys

import numpy as np
import pytest

from conftest import ROOT, run_train
from tiny_data import metrics, shapes

sys.path.insert(0, str(ROOT / "experiments"))
import texture  # noqa: E402


@pytest.fixture(scope="module")
def clips():
    return shapes.make_dataset(seed=3, num_clips=4, num_frames=8, textured=True)


def test_blurring_keeps_a_flat_inside_and_washes_out_the_pattern(clips):
    flat = np.full((16, 16, 3), 200, np.uint8)
    assert np.array_equal(texture.blurred(flat)[1:-1, 1:-1], flat[1:-1, 1:-1])
    assert texture.blurred(flat)[0, 0, 0] == round(200 * 4 / 9)            # black beyond the border
    frames = clips["frames"][:, :4]
    kept = [metrics.detail_kept(texture.blurred(f), f).mean() for f in frames]
    assert max(kept) < 0.15, kept                                           # a 3x3 blur loses the 2x2 blocks
    dimmed = texture.SPOILED["dimmed"](frames)
    assert np.abs(dimmed.astype(int) - np.round(frames / 2)).max() == 0


@pytest.mark.slow
def test_the_probe_after_a_true_history_is_the_first_chunk_check(tmp_path, capsys):
    run_train(tmp_path / "run", "--steps", "2", "--no-sample")
    run = str(tmp_path / "run")
    test = shapes.load_dataset(shapes.TEXTURED_TEST_PATH)
    args = texture.parse_args([run, "--clips", "3", "--batch", "2"])

    class Bar:
        def update(self, n):
            pass
    probe = texture.probe_chunks(run, test, args, Bar())
    first = texture.first_chunks(run, test, args, Bar())
    assert np.array_equal(probe["true"], first[texture.PROBE_HISTORY // texture.FPC])
    assert not np.array_equal(probe["blurred"], probe["true"])              # the spoiled history is what it sees
    assert not np.array_equal(probe["dimmed"], probe["true"])

    out = tmp_path / "probe.json"
    texture.main([run, run, "--probe", "--clips", "3", "--batch", "2", "--json", str(out),
                  "--png", str(tmp_path / "probe.png"), "--png_clips", "2"])
    rows = json.loads(out.read_text())["rows"]
    paired = rows[-1]                                                       # the same model twice: no difference
    assert paired["detail_kept blurred"] == [0.0, 0.0] and paired["psnr dimmed"] == [0.0, 0.0]
    assert (tmp_path / "probe.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        texture.parse_args([run, "--probe", "--first"])
