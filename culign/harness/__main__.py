"""Prints the folder to give lm_eval as --include_path."""
from . import TASK_DIR

print(TASK_DIR)
