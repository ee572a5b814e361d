"""Export a TrinityX run (or checkpoint) as a Hugging Face folder: the same as `trinityx export-hf`.

    python tools/convert_to_hf.py RUN_DIR OUT [--format trinityx|dense|mixtral] [--expert NAME] [--overwrite]
"""
import argparse
import sys

from trinityx_ds.convert.export import add_export_arguments, cmd_export


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_export_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_export(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: one line, no traceback
        print(f"convert_to_hf: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
