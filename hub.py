"""Loading a model by name (a local folder, the local Hugging Face cache, or the hub), and failing in seconds offline.

from_pretrained's own answer to a model that is in none of these places is a minute of retries and then a traceback;
here it is one line within seconds, naming the model and the option to pass instead:

    pipe = hub.from_pretrained(sdxl.load_pipeline, "stabilityai/stable-diffusion-xl-base-1.0")
    dino = hub.from_pretrained(ViTModel.from_pretrained, "facebook/dino-vits16", "DINO model", "--dino", "a smoke run")
"""
import os
import socket
import threading
from urllib.parse import urlparse


def hub_reachable(timeout=3.0):
    """True if the hub's host accepts a TCP connection within `timeout` s (DNS included: run in a thread, because
    getaddrinfo ignores socket timeouts)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def from_pretrained(load, name, what="model", flag="--model", tiny_use="the offline CPU demo", **kwargs):
    """load(name, **kwargs) for a local folder, the local Hugging Face cache or the hub, except that a model in none
    of them fails within seconds (not after a minute of retries), saying which model and what to pass instead.

    `load` is any from_pretrained-like function that takes local_files_only (sdxl.load_pipeline, sdxl.load_unet,
    ViTModel.from_pretrained, ...); `what`/`flag`/`tiny_use` word the message."""
    if os.path.isdir(name):
        return load(name, local_files_only=True, **kwargs)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{what} folder {name} does not exist (pass {flag} with a hub id like owner/name or "
                                f"an existing folder, or {flag} tiny for {tiny_use})")
    try:
        return load(name, local_files_only=True, **kwargs)  # already in the local cache (or `tiny`)
    except (OSError, ValueError):  # not (completely) in the local cache
        if not hub_reachable():
            raise FileNotFoundError(
                f"{what} {name!r} is not available: it is not a local folder, not in the local Hugging Face cache, and "
                f"the hub cannot be reached (no network). Download it where there is network (huggingface-cli "
                f"download {name} --local-dir DIR) and pass {flag} DIR, or pass {flag} tiny for {tiny_use}") from None
    return load(name, **kwargs)
