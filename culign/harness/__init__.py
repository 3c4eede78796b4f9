"""culign's survey for EleutherAI's lm-evaluation-harness: ``--include_path "$(python -m culign.harness)"``."""
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
