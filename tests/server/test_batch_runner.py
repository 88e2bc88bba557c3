"""Batch files written chunk by chunk: whole lines, numbered, their size and checksum."""

import hashlib
from types import SimpleNamespace

from server.batch_runner import CHUNK_BYTES, FileWriter


def test_an_output_file_comes_out_in_chunks_of_whole_lines_with_its_checksum():
    file = FileWriter.output_of(SimpleNamespace(id="batch_x", user_id=7), "output")
    lines = [f'{{"custom_id": "r{i}", "pad": "{"x" * 1000}"}}' for i in range(2500)]
    chunks = [chunk for line in lines if (chunk := file.add(line))] + [file.rest()]
    data = "".join(line + "\n" for line in lines)
    assert len(chunks) == 3 and all(len(c[3].encode()) <= CHUNK_BYTES + 1100 for c in chunks)
    assert [seq for _, seq, _, _ in chunks] == [0, 1, 2]
    assert "".join(c[3] for c in chunks) == data
    assert [first for _, _, first, _ in chunks] == [1, 1 + chunks[0][3].count("\n"),
                                                   1 + chunks[0][3].count("\n")
                                                   + chunks[1][3].count("\n")]
    row = file.row()
    assert (row.lines, row.bytes, row.purpose) == (2500, len(data.encode()), "batch_output")
    assert row.sha256 == hashlib.sha256(data.encode()).hexdigest()
    assert file.rest() is None  # nothing left once written


def test_an_uploaded_file_is_cut_the_same_way():
    upload = FileWriter("file-up", 7, "batch", "in.jsonl")
    lines = ["y" * 600_000, "z" * 600_000, "short"]
    chunks = [chunk for line in lines if (chunk := upload.add(line))] + [upload.rest()]
    assert [(first, len(text)) for _, _, first, text in chunks] == [
        (1, 600_001), (2, 600_007)]
