"""The front page and the docs: the README's two commands are what CI and the Makefile run, every link and anchor
resolves, and docs/cli.md names every flag of every script and subcommand."""

import argparse
import re
from unittest import mock

import pytest
from helpers import ROOT, script

from dp_diffusers.cli import build_parser

DOCS = sorted((ROOT / "docs").glob("*.md"))


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def script_parser(name: str) -> argparse.ArgumentParser:
    """The ArgumentParser that ``training_scripts/<name>.py`` builds (caught as it parses)."""
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch), pytest.raises(SystemExit):
        script(name).parse_args([])
    return caught[0]


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


def test_readme_is_a_front_page_whose_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    commands = re.search(r"```bash\n(make demo.*?)\n(make test.*?)\n```", readme)
    assert commands, "the README's first commands are `make demo` and `make test`"
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "USER_LEVEL" not in readme and not any("USER_LEVEL" in doc.read_text() for doc in DOCS)


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda path: path.name)
def test_every_link_and_anchor_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            assert anchor in {slug(heading) for heading in headings}, f"{page.name}: no heading for #{anchor}"


def test_docs_cli_names_every_flag_of_every_script_and_subcommand():
    cli_doc = (ROOT / "docs" / "cli.md").read_text()
    parsers = {f"{name}.py": script_parser(name) for name in ("train_dp_lora", "train_autoencoder", "train_ldm")}
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    parsers.update({f"dp-diffusers {name}": parser for name, parser in subcommands.items()})
    for name, parser in parsers.items():
        assert f"`dp-diffusers {name.split()[-1]} " in cli_doc or name.endswith(".py")
        missing = sorted(flag for flag in flags(parser) - {"--help"} if f"`{flag}`" not in cli_doc)
        assert not missing, f"docs/cli.md lacks {name}'s {missing}"


def flag_tables() -> str:
    """docs/cli.md's "Every flag" section, generated from the parsers (``python tests/test_docs.py`` rewrites it)."""
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    parsers = [(f"`training_scripts/{name}.py`", script_parser(name))
               for name in ("train_dp_lora", "train_autoencoder", "train_ldm")]  # fmt: skip
    for name, parser in subcommands.items():
        positionals = [a.dest.upper() for a in parser._actions if not a.option_strings]
        extra = ["[train_dp_lora.py flags]"] if parser.get_default("accepts_training_flags") else []
        parsers.append((f"`dp-diffusers {' '.join([name, *positionals, *extra])}`", parser))
    lines = ["## Every flag", "", "Generated from the parsers (defaults as the code has them; empty: none, or decided "
             "at run time as the meaning says).", ""]  # fmt: skip
    for title, parser in parsers:
        lines += [f"### {title}", ""]
        for group in parser._action_groups:
            actions = [a for a in group._group_actions if a.option_strings and a.option_strings[0] != "-h"]
            if not actions:
                continue
            general = group.title in ("options", "optional arguments", "positional arguments")
            name = "general" if general else group.title
            lines += [f"**{name}**", "", "| flag | default | meaning |", "|---|---|---|"]
            for action in actions:
                if isinstance(action, argparse._StoreTrueAction):
                    default = "off"
                elif action.default is None or action.default == argparse.SUPPRESS:
                    default = ""
                else:
                    default = f"`{action.default}`"
                if action.choices:
                    default = f"{default} ({', '.join(map(str, action.choices))})".strip()
                meaning = (action.help or "").replace("|", "\\|").replace("\n", " ")
                if action.nargs in ("+", "*"):
                    meaning = f"{meaning} (several values)".strip()
                elif isinstance(action, argparse._AppendAction):
                    meaning = f"{meaning} (repeatable)".strip()
                lines.append(f"| `{action.option_strings[-1]}` | {default} | {meaning} |")
            lines.append("")
    return "\n".join(lines)


def test_the_flag_tables_are_the_parsers():
    text = (ROOT / "docs" / "cli.md").read_text()
    assert text[text.index("## Every flag"):].rstrip() == flag_tables().rstrip(), "run: python tests/test_docs.py"


if __name__ == "__main__":  # rewrite docs/cli.md's flag tables from the parsers
    path = ROOT / "docs" / "cli.md"
    text = path.read_text()
    path.write_text(text[: text.index("## Every flag")] + flag_tables().rstrip() + "\n")
