"""``npu-rft convert-data``: raw data -> {system, context, target, meta} JSONL (npu_rft.data.convert)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import click

from npu_rft.data.convert import CONVERTERS, MAPPABLE_FIELDS, ConvertOptions, InvalidRowsError, convert
from npu_rft.data.schema import DataError
from npu_rft.data.templates import LANGUAGES


def _train_size(text: Optional[str]) -> Optional[Union[int, float]]:
    if text is None:
        return None
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a row count (800) nor a fraction (0.7)", param_hint="--train-size")


def _field_map(pairs: Tuple[str, ...], candidates_field: Optional[str]) -> dict:
    fields = {}
    for pair in pairs:
        key, sep, name = pair.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise click.BadParameter(f"{pair!r}: write KEY=NAME, e.g. context=question", param_hint="--field")
        fields[key.strip()] = name.strip()
    if candidates_field is not None:
        fields["candidates"] = candidates_field
    return fields


@click.command("convert-data")
@click.option("--format", "format_", type=click.Choice(CONVERTERS.names()), default="dxbench", show_default=True,
              help="dxbench: DxBench cases; jsonl: any JSON/JSONL objects, fields mapped with --field; "
                   "hf: a local Hugging Face dataset.")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True), help="Input file (or dataset folder).")
@click.option("--out-dir", type=click.Path(file_okay=False),
              help="Write data.jsonl here, or train.jsonl and eval.jsonl with --train-size.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write one file (no split).")
@click.option("--train-size", help="Training rows: a count (800) or a fraction of the valid rows (0.7).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and of --shuffle-candidates.")
@click.option("--shuffle-candidates", is_flag=True, help="Shuffle each case's candidates (seeded), so that the "
              "given order is no shortcut to the answer.")
@click.option("--template", type=click.Path(exists=True, dir_okay=False),
              help="Template file with {placeholders}; write literal braces as {{ and }}.")
@click.option("--lang", type=click.Choice(LANGUAGES), default="zh", show_default=True,
              help="Language of the built-in DxBench template and system prompt.")
@click.option("--system", help="System prompt for every row (default: the built-in one for dxbench).")
@click.option("--no-meta", is_flag=True, help="Write strict system/context/target rows, without meta.")
@click.option("--skip-invalid", is_flag=True, help="Write the good rows; put bad ones, with reasons, in rejects.jsonl.")
@click.option("--field", "field_pairs", multiple=True, metavar="KEY=NAME",
              help=f"jsonl/hf: read KEY ({', '.join(MAPPABLE_FIELDS)}) from input field NAME.")
@click.option("--candidates-field", metavar="NAME", help="jsonl/hf: the input field with the candidates "
              "(same as --field candidates=NAME).")
@click.option("--hf-split", help="hf: the split to read, when the dataset has several.")
def command(
    format_: str,
    input_path: str,
    out_dir: Optional[str],
    output: Optional[str],
    train_size: Optional[str],
    seed: int,
    shuffle_candidates: bool,
    template: Optional[str],
    lang: str,
    system: Optional[str],
    no_meta: bool,
    skip_invalid: bool,
    field_pairs: Tuple[str, ...],
    candidates_field: Optional[str],
    hf_split: Optional[str],
) -> None:
    """Convert DxBench, any JSON/JSONL or a Hugging Face dataset into training rows, and print a summary."""
    if (out_dir is None) == (output is None):
        raise click.UsageError("give exactly one of --out-dir and --output")
    if output is not None and train_size is not None:
        raise click.UsageError("--train-size writes train.jsonl and eval.jsonl: use --out-dir instead of --output")
    try:
        options = ConvertOptions(
            format=format_,
            template=template,
            lang=lang,
            system=system,
            shuffle_candidates=shuffle_candidates,
            seed=seed,
            meta=not no_meta,
            skip_invalid=skip_invalid,
            train_size=_train_size(train_size),
            fields=_field_map(field_pairs, candidates_field),
            hf_split=hf_split,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        summary = convert(input_path, out_dir=out_dir, output=output, options=options)
    except InvalidRowsError as exc:
        raise click.ClickException(
            f"{exc}\nNothing was written. Fix these rows, or pass --skip-invalid to write the good rows "
            "and put these in rejects.jsonl."
        ) from None
    except DataError as exc:
        raise click.ClickException(f"{exc}\nNothing was written.") from None
    for line in summary.report():
        click.echo(line)
