"""fategen's link to ComfyUI: the wire protocol (`wire`), one server's session with its
WebSocket, prompt trackers and image fetching (`session`), and the idle-unload watchdog.

May import `fategen.core` and `fategen.errors`; it knows nothing of jobs or the store.
"""
