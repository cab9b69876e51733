"""ComfyUI nodes (a thin adapter over sfgrpo_core). Filled in by the ComfyUI plugin issue."""
