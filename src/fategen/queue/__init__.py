"""The queue's actors: the scheduler (who goes next), the worker that runs jobs on ComfyUI,
and the post-processor that turns finished prompts into result files.

May import `fategen.store`, `fategen.comfy`, `fategen.core` and `fategen.errors`; not the API.
"""
