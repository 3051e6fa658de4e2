"""How the generated files are written: YAML documents with a comment above each, block style with
indented lists, small mappings and lists on one line (`Flow`, `FlowList`), multi-line strings as
literal blocks; JSON with one node per line. Stdlib and PyYAML only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml


class Flow(dict[str, Any]):
    """A mapping written on one line: {name: PORT, value: "8080"}."""


class FlowList(list[Any]):
    """A list written on one line: ["python", "-m", "gateway"]."""


@dataclass(frozen=True)
class Doc:
    comment: str  # lines written as "# ..." above the document; may be empty
    body: dict[str, Any]


class Quoted(str):
    """A string written in double quotes ("8000:8000", which YAML 1.1 readers may take for a number)."""


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML has no type information here
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # lists indented under their key

    def ignore_aliases(self, data: Any) -> bool:
        return True  # a shared object is written out each time, never as an &anchor


def _flow_map(dumper: yaml.SafeDumper, data: Flow) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True)


def _flow_list(dumper: yaml.SafeDumper, data: FlowList) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


def _text(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


def _quoted(dumper: yaml.SafeDumper, data: Quoted) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(data), style='"')


_Dumper.add_representer(Quoted, _quoted)
_Dumper.add_representer(Flow, _flow_map)
_Dumper.add_representer(FlowList, _flow_list)
_Dumper.add_representer(str, _text)


def comment(text: str) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in text.strip("\n").splitlines()) if text else ""


def to_yaml(body: Any) -> str:
    out: str = yaml.dump(body, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
    return out


def dump(docs: list[Doc]) -> str:
    """The documents of one file, separated by `---`."""
    return "---\n".join(comment(d.comment) + to_yaml(d.body) for d in docs)


def gateway_json(config: dict[str, Any]) -> str:
    """A gateway config.json: one key per line, one node per line (readable diffs)."""
    lines = []
    for key, value in config.items():
        if key == "nodes":
            nodes = ",\n".join(f"    {json.dumps(n)}" for n in value)
            lines.append(f'  "nodes": [\n{nodes}\n  ]')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"
