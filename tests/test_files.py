import os
import stat

import pytest

from ctflow.errors import CTFlowError
from ctflow.files import atomic_dir, atomic_path, check_output


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_atomic_outputs_get_the_mode_of_a_plain_write_not_the_temp_files_0600(tmp_path, umask_027):
    with atomic_path(tmp_path / "ct.nii.gz") as tmp:
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "series") as tmp:
        (tmp / "a.dcm").write_bytes(b"x")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "model.safetensors").write_bytes(b"x")  # as a library writes it: a 0600 temp, renamed
        os.chmod(tmp / "sub" / "model.safetensors", 0o600)
        (tmp / "key").write_bytes(b"x")
        os.chmod(tmp / "key", 0o400)  # a mode set on purpose is kept
    assert stat.S_IMODE((tmp_path / "ct.nii.gz").stat().st_mode) == 0o640  # 0666 & ~027
    assert stat.S_IMODE((tmp_path / "series").stat().st_mode) == 0o750  # 0777 & ~027
    assert stat.S_IMODE((tmp_path / "series/sub/model.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "series/key").stat().st_mode) == 0o400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "series"]  # no temp left behind


def test_a_failed_write_leaves_nothing_and_an_existing_output_needs_overwrite(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out.json").write_text("old")
    with pytest.raises(CTFlowError, match="--overwrite"), atomic_path(tmp_path / "out.json"):
        pass
    with atomic_path(tmp_path / "out.json", overwrite=True) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "out.json").read_text() == "new"


def test_an_output_that_appears_during_the_write_is_not_replaced(tmp_path):
    """Two runs writing the same output: the check before the write and the rename are one step."""
    with pytest.raises(CTFlowError, match="appeared while it was being written"):
        with atomic_path(tmp_path / "ct.nii.gz") as tmp:
            tmp.write_text("ours")
            (tmp_path / "ct.nii.gz").write_text("theirs")
    assert (tmp_path / "ct.nii.gz").read_text() == "theirs"
    with pytest.raises(CTFlowError, match="appeared while it was being written"):
        with atomic_dir(tmp_path / "series") as tmp:
            (tmp / "a.dcm").write_text("ours")
            (tmp_path / "series").mkdir()
            (tmp_path / "series" / "b.dcm").write_text("theirs")
    assert [p.name for p in (tmp_path / "series").iterdir()] == ["b.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "series"]  # no temp left behind


def test_a_write_the_system_refuses_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CTFlowError, match=r"cannot write .*file/sub/p.png: .*check the folder") as e:
        with atomic_path(tmp_path / "file" / "sub" / "p.png") as tmp:
            tmp.write_text("never")
    assert "\n" not in str(e.value)
    with pytest.raises(CTFlowError, match="No space left on device"):
        with atomic_path(tmp_path / "out.bin") as tmp:
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_the_folder_ctflow_runs_in_is_never_an_output(tmp_path, monkeypatch):
    """`--out . --overwrite` would replace the working folder (everything in it) with the output."""
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for path in (".", "..", str(work), str(tmp_path / "a")):
        with pytest.raises(CTFlowError, match="the folder ctflow runs in"):
            check_output(path, overwrite=True)
    assert check_output(tmp_path / "a" / "other", overwrite=True) == tmp_path / "a" / "other"


def test_remove_temporaries_takes_what_a_killed_writer_left_and_nothing_else(tmp_path):
    from ctflow.files import remove_temporaries

    (tmp_path / ".transformer.k3j2.tmp").mkdir()  # atomic_dir's, killed before its finally
    (tmp_path / ".transformer.k3j2.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".shard_00001.x8.tmp.safetensors").write_bytes(b"half")  # atomic_path's
    (tmp_path / ".vae.old").mkdir()  # beside the finished vae/ that replaced it
    (tmp_path / "vae").mkdir()
    for keep in ("log.jsonl", "config.json", ".hidden"):
        (tmp_path / keep).write_text("x")
    assert remove_temporaries(tmp_path) == [
        ".shard_00001.x8.tmp.safetensors",
        ".transformer.k3j2.tmp",
        ".vae.old",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "config.json", "log.jsonl", "vae"]
    (tmp_path / "vae").rmdir()
    assert remove_temporaries(tmp_path / "missing") == []
    # killed between atomic_dir's two renames: the old copy is the only finished one, and comes back
    (tmp_path / ".vae.old").mkdir()
    (tmp_path / ".vae.old" / "config.json").write_text("{}")
    assert remove_temporaries(tmp_path) == [".vae.old"]
    assert (tmp_path / "vae" / "config.json").exists() and not (tmp_path / ".vae.old").exists()
