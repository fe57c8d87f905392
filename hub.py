"""Loading a model by name (a local folder, the local Hugging Face cache, or the hub), and failing in seconds offline.

from_pretrained's own answer to a model that is in none of these places is a minute of retries and then a traceback;
here it is one line within seconds, naming the model and the option to pass instead:

    pipe = hub.from_pretrained(sdxl.load_pipeline, "stabilityai/stable-diffusion-xl-base-1.0")
    pipe = hub.from_pretrained(sdxl.load_pipeline, "sdxl-fp16-folder", variant="fp16")  # *.fp16.safetensors files
    dino = hub.from_pretrained(ViTModel.from_pretrained, "facebook/dino-vits16", "DINO model", "--dino", "a smoke run")

A model whose weight files are of another variant than the one asked for (a folder holding only the fp16 files, the
usual download to halve the disk, loaded without variant="fp16") fails in one line naming --variant, not in
diffusers' traceback ("Error no file named model.safetensors ... text_encoder").
"""
import json
import os
import re
import socket
import threading
from pathlib import Path
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


def from_pretrained(load, name, what="model", flag="--model", tiny_use="the offline CPU demo", variant=None, **kwargs):
    """load(name, **kwargs) for a local folder, the local Hugging Face cache or the hub, except that a model in none
    of them fails within seconds (not after a minute of retries), saying which model and what to pass instead, and
    a model without the weight files of `variant` (None or "": the default files) fails in one line naming the
    variants it has (missing_variant), before diffusers' traceback. A hub id with network is loaded as diffusers
    loads it (which downloads the variant's files that the cache lacks).

    `load` is any from_pretrained-like function that takes local_files_only (sdxl.load_pipeline, sdxl.load_unet,
    ViTModel.from_pretrained, ...); `what`/`flag`/`tiny_use` word the message."""
    kwargs = dict(kwargs, variant=variant) if variant else kwargs
    if os.path.isdir(name):  # checked before loading: in milliseconds, without diffusers' warnings and traceback
        problem = missing_variant(name, variant or None, flag)
        if problem:
            raise FileNotFoundError(f"{what} {name}: {problem}")
        return load(name, local_files_only=True, **kwargs)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{what} folder {name} does not exist (pass {flag} with a hub id like owner/name or "
                                f"an existing folder, or {flag} tiny for {tiny_use})")
    try:
        return load(name, local_files_only=True, **kwargs)  # already in the local cache (or `tiny`)
    except (OSError, ValueError):  # not (completely) in the local cache
        if not hub_reachable():
            problem = missing_variant(cached_snapshot(name), variant or None, flag)  # cached, but another variant
            if problem:
                raise FileNotFoundError(f"{what} {name} (in the local Hugging Face cache): {problem}") from None
            raise FileNotFoundError(
                f"{what} {name!r} is not available: it is not a local folder, not in the local Hugging Face cache, and "
                f"the hub cannot be reached (no network). Download it where there is network (huggingface-cli "
                f"download {name} --local-dir DIR) and pass {flag} DIR, or pass {flag} tiny for {tiny_use}") from None
    return load(name, **kwargs)


# The weight files of a component: <name>[.<variant>][-00001-of-00002][.<variant>].safetensors or .bin (diffusers
# and transformers put a variant and a shard number in either order)
WEIGHT_FILE = re.compile(r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:\.(\w+))?(?:-\d+-of-\d+)?(?:\.(\w+))?"
                         r"\.(?:safetensors|bin)$")


def variants_in(folder):
    """{component: {variant: one of its weight files}} for a diffusers model folder: a pipeline's components (those
    model_index.json names), or a model alone ("."); variant None is the default files."""
    index = folder / "model_index.json"
    components = [folder / key for key, value in json.loads(index.read_text()).items()
                  if isinstance(value, list) and value[0] and (folder / key).is_dir()] if index.is_file() else [folder]
    found = {}
    for component in components:
        for file in sorted(component.iterdir()):
            match = WEIGHT_FILE.match(file.name)
            if match:
                found.setdefault(component.name if component != folder else ".", {}).setdefault(match[1] or match[2],
                                                                                                file.name)
    return found


def missing_variant(folder, variant, flag="--model"):
    """Why the model in `folder` (None: no folder) cannot load the weight files of `variant` (None: the default ones),
    if that is why: one of its components has weight files of other variants only. Else None (the load says what is
    wrong, if anything). The advice names the scripts' --variant for their --model; another model (`flag`, e.g.
    --dino) is always loaded from its default files."""
    if folder is None:
        return None
    try:
        found = variants_in(Path(folder))
    except (OSError, ValueError):  # an unreadable folder or model_index.json: the load will say what is wrong
        return None
    for component, files in found.items():
        if variant not in files:
            have = sorted(files, key=str)
            advice = " or ".join(f"pass --variant {v}" if v else "leave out --variant" for v in have)
            return (f"its {component} has no {f'{variant}-variant' if variant else 'default (non-variant)'} weight "
                    f"files, only {' and '.join(f'{v}-variant' if v else 'default' for v in have)} ones "
                    f"({', '.join(files[v] for v in have)}): "
                    + (advice if flag == "--model" else f"{flag} needs a folder with default weight files"))
    return None


def cached_snapshot(repo_id):
    """The local Hugging Face cache's folder of hub model `repo_id`, or None if it has none."""
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, not a valid id, ...: nothing to look at
        return None
