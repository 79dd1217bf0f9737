"""Hello, pipeline: watch a file and keep a derived file up to date.

    pipeline run examples/hello.py -- FILE [--out OUT]

The file's content is watched; each new content is summarised (a pure map) and a cached builder
writes the summary to OUT (default: FILE.summary). Edit FILE and only the builder runs again;
restart on the same state directory and nothing runs at all.
"""

import argparse
import asyncio
from pathlib import Path

import pipeline as p


def summarise(text: str) -> str:
    """An upper-cased copy of the text with a line and word count."""
    lines = text.splitlines()
    return f"{len(lines)} lines, {len(text.split())} words\n{text.upper()}"


@p.builder("write-summary", auto_cancel=True, pp=lambda key: key[0])
async def write_summary(job: p.Job, key: tuple[str, str]) -> str:
    """Write the summary to the output file; the key holds the path and the summary."""
    out, summary = key
    job.log(f"Writing {len(summary)} characters to {out}")
    await asyncio.to_thread(Path(out).write_text, summary)
    return out


def pipeline(args: list[str]) -> p.Term[str]:
    """The hello pipeline: file -> summarise -> write-summary."""
    parser = argparse.ArgumentParser(prog="hello.py")
    parser.add_argument("file", type=Path, help="the file to watch")
    parser.add_argument("--out", type=Path, help="where to write the summary")
    options = parser.parse_args(args)
    out = str((options.out or options.file.with_name(options.file.name + ".summary")).absolute())
    summary = p.watch_file(options.file).map(summarise, label="summarise")
    return write_summary(summary.map(lambda text: (out, text), label="output"))
