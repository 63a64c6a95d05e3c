"""The files the vision-language examples name, made to exist under a temporary folder."""

from __future__ import annotations


def llava_example_paths(tmp_path) -> list[str]:
    """Flags that point the example's data, images, weights and tokenizer at empty files
    (flags override the YAML's): enough for the config checks, not for a run."""
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "model.pt").write_bytes(b"")
    (tmp_path / "tok").mkdir()
    (tmp_path / "mix.json").write_text("[]")
    return ["--data-path", str(tmp_path / "mix.json"), "--image-root", str(tmp_path),
            "--pretrained-checkpoint", str(tmp_path / "dense"),
            "--tokenizer-model", str(tmp_path / "tok")]
