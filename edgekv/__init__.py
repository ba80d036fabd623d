"""edgekv: unbounded-context LLMs on static-shape NPUs."""

__version__ = "0.1.0"

# Version of the artifact layout (manifest.json and the graph interface). Bump it whenever a
# graph's inputs/outputs or the manifest's meaning change; loaders refuse other versions.
ARTIFACT_FORMAT_VERSION = 1
