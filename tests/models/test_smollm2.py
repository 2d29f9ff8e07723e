"""`deepred make-smollm2-model`: a destination that cannot be written is refused before the half-minute build."""

from __future__ import annotations

from deepred.cli import main
from deepred.models import smollm2


def test_an_unwritable_destination_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def load_reached(source):
        raise AssertionError("the model was loaded before the destination was known to be writable")

    monkeypatch.setattr(smollm2, "_load_packaged", load_reached)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root ignores permissions; a file in the path refuses everyone
    assert main(["make-smollm2-model", str(blocker / "smollm2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "a-file" in err
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
