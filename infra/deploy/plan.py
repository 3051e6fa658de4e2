"""What every deployment file is generated from: the number of stages (a bundle's manifest, or N
given), the model's name, and the names, ports and images the targets share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from functions import contract
from functions.bundle import load_manifest, short_name

NAMESPACE = "model-inference"
PART_OF = "tandem"
REGISTRY = "registry.example.com/tandem"  # Kubernetes, Knative, KServe: replace with yours
CLOUD_RUN_REGISTRY = "REGION-docker.pkg.dev/PROJECT/tandem"
VERSION = "0.1.0"
FUNCTION_PORT = 8080  # the function image's PORT (Knative, Cloud Run and KServe set it too)
GATEWAY_PORT = 8000
FRONTEND_PORT = 5173
TOKENIZER = "tokenizer"
GATEWAY = "gateway"
FRONTEND = "frontend"
OTLP_ENDPOINT = "http://jaeger:4318"  # the Jaeger service of compose and Kubernetes


@dataclass(frozen=True)
class Function:
    """One tokenizer or stage service (compose: also the second replica of one stage)."""

    service: str  # compose service, Kubernetes/Knative/KServe/Cloud Run name
    stage: int | None  # 1-based stage, None for the tokenizer
    port: int  # its port in compose (every service on its own port, for host networking)

    @property
    def command(self) -> list[str]:
        """The command of the function image, given the bundle directory (appended)."""
        if self.stage is None:
            return ["python", "-m", "functions.tokenizer", "--bundle"]
        return ["python", "-m", "functions.stage", "--stage", str(self.stage), "--bundle"]

    @property
    def stage_name(self) -> str | None:
        return None if self.stage is None else contract.stage_name(self.stage)


@dataclass(frozen=True)
class Plan:
    stages: int
    model: str = "gpt2"  # config.json's model_name, and what the export jobs export

    def __post_init__(self) -> None:
        if not 1 <= self.stages <= 99:
            raise ValueError(f"the number of stages must be 1-99, got {self.stages}")

    @classmethod
    def from_bundle(cls, bundle: Path) -> Plan:
        manifest = load_manifest(bundle)
        return cls(len(manifest.stages), short_name(str(manifest.model["id"])))

    @property
    def names(self) -> list[str]:
        return [contract.stage_name(k) for k in range(1, self.stages + 1)]

    @property
    def replicated(self) -> int:
        """The stage compose runs twice (the middle one): a sequence moves, replaying, when its
        replica fails."""
        return min(2, self.stages)

    def compose_functions(self) -> list[Function]:
        """Tokenizer on 8100, stage k on 8100 + k, the second replica of stage k on 8200 + k."""
        out = [Function(TOKENIZER, None, 8100)]
        out += [Function(contract.stage_name(k), k, 8100 + k) for k in range(1, self.stages + 1)]
        r = self.replicated
        out.append(Function(f"{contract.stage_name(r)}-b", r, 8200 + r))
        return out

    def functions(self) -> list[Function]:
        """One service per function on the cluster targets (replicas are the platform's)."""
        return [f for f in self.compose_functions() if not f.service.endswith("-b")]


def image(name: str, registry: str = REGISTRY) -> str:
    return f"{registry}/{name}:{VERSION}"
