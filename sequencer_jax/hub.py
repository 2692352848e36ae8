"""Published weights on the Hugging Face Hub: timm's Sequencer repositories.

A Hub source is ``hf-hub:OWNER/REPO`` (``hf-hub:timm/sequencer2d_s.in1k``), optionally
pinned to a revision (a branch, tag or commit) as ``hf-hub:OWNER/REPO@REVISION``. Files
come through ``huggingface_hub``: its cache (``HF_HOME``, ``HF_HUB_CACHE``), offline mode
(``HF_HUB_OFFLINE=1``) and mirrors (``HF_ENDPOINT``). A repository holds timm's
``model.safetensors`` and ``config.json``, which names the architecture (``architecture``,
``num_classes``, optional ``model_args``) and the preprocessing its weights were trained
with (``pretrained_cfg``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

from sequencer_jax.errors import UserError

PREFIX = 'hf-hub:'
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
# Registered variants with published ImageNet-1K weights: timm's repositories.
PUBLISHED = {name: f'timm/{name}.in1k'
             for name in ('sequencer2d_s', 'sequencer2d_m', 'sequencer2d_l')}
# timm's pretrained_cfg keys that say how to feed the weights, and their values for
# timm's Sequencer weights (ImageNet mean and std, bicubic, crop_pct 0.875, the centre
# crop, 224 px).
PREPROCESSING_DEFAULTS = {'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
                          'interpolation': 'bicubic', 'crop_pct': 0.875,
                          'crop_mode': 'center', 'input_size': (3, 224, 224)}


@dataclasses.dataclass(frozen=True)
class Fetched:
    """The files of one Hub repository at one commit, in huggingface_hub's cache."""

    repo_id: str
    commit: str
    weights_file: str
    config: dict[str, Any]


def is_hub_source(source: Any) -> bool:
    return str(source).startswith(PREFIX)


def parse_source(source: str) -> tuple[str, str | None]:
    """``hf-hub:OWNER/REPO[@REVISION]`` -> (repo id, revision or None)."""
    repo_id, _, revision = str(source)[len(PREFIX):].partition('@')
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise UserError(f'{source!r} is not a Hub source; write hf-hub:OWNER/REPO, e.g. '
                        'hf-hub:timm/sequencer2d_s.in1k (pinned: ...in1k@COMMIT).')
    return repo_id, revision or None


def source_for(name: str, revision: str | None = None) -> str:
    """The Hub source of a variant with published weights (``sequencer2d_s``), or of a
    repository id (``timm/sequencer2d_s.in1k``)."""
    repo_id = PUBLISHED.get(name, name if '/' in name else None)
    if repo_id is None:
        raise UserError(f'No published weights for {name!r}; the variants with weights are '
                        f'{", ".join(PUBLISHED)} (or give a Hub repository, OWNER/REPO).')
    return PREFIX + repo_id + (f'@{revision}' if revision else '')


def fetch(source: str) -> Fetched:
    """The weights and config of a Hub source, downloaded on first use (or taken from
    huggingface_hub's cache). A cached weights file whose content does not match its
    hash is downloaded again."""
    repo_id, revision = parse_source(source)
    config_file = _download(repo_id, CONFIG_FILE, revision)
    weights_file = _download(repo_id, WEIGHTS_FILE, revision)
    if not _matches_its_hash(weights_file):
        if hub_constants.is_offline_mode():
            raise UserError(f'The cached {WEIGHTS_FILE} of {repo_id} is corrupt (its content '
                            'does not match its hash), and HF_HUB_OFFLINE is set: unset it to '
                            'fetch it again, or delete that file from the cache.')
        weights_file = _download(repo_id, WEIGHTS_FILE, revision, force_download=True)
        if not _matches_its_hash(weights_file):
            raise UserError(f'{WEIGHTS_FILE} of {repo_id} does not match its hash even when '
                            'downloaded again; check HF_ENDPOINT (a mirror) and the network.')
    with open(config_file) as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise UserError(f'{CONFIG_FILE} of {repo_id} is not JSON ({e}).') from None
    # The snapshot folder that holds the files is named by the commit they are at.
    commit = os.path.basename(os.path.dirname(weights_file))
    return Fetched(repo_id, commit, weights_file, config)


def architecture(fetched: Fetched) -> tuple[str, int, dict[str, Any]]:
    """(registered variant, num_classes, create_model options) named by timm's
    ``config.json`` (``architecture``, ``num_classes``, ``model_args``)."""
    config = fetched.config
    name = config.get('architecture')
    if not isinstance(name, str):
        raise UserError(f'{CONFIG_FILE} of {fetched.repo_id} names no architecture (no '
                        '"architecture" key): it is not a timm model repository.')
    num_classes = config.get('num_classes', config.get('pretrained_cfg', {}).get(
        'num_classes', 1000))
    return name, int(num_classes), dict(config.get('model_args') or {})


def preprocessing(fetched: Fetched) -> dict[str, Any]:
    """How the weights want their images (timm's ``pretrained_cfg``): ``mean``, ``std``
    (of [0, 1] images), ``interpolation``, ``crop_pct``, ``crop_mode``, ``input_size``
    (C, H, W)."""
    cfg = fetched.config.get('pretrained_cfg') or fetched.config  # older, flat configs
    return {key: tuple(cfg[key]) if isinstance(cfg.get(key), list) else cfg.get(key, default)
            for key, default in PREPROCESSING_DEFAULTS.items()}


def _download(repo_id: str, filename: str, revision: str | None,
              force_download: bool = False) -> str:
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                               force_download=force_download)
    except hub_errors.LocalEntryNotFoundError:
        raise UserError(
            f'Cannot fetch {filename} of {repo_id}: no network (or HF_HUB_OFFLINE is set) and '
            'no copy in the Hub cache. Fetch it where there is network (hf download '
            f'{repo_id} --cache-dir DIR), copy DIR here and set HF_HUB_CACHE=DIR, or set '
            'HF_ENDPOINT to a mirror.') from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(f'The Hub has no repository {repo_id} (or it is private); the '
                        f'published Sequencer weights are {", ".join(PUBLISHED.values())}.'
                        ) from None
    except hub_errors.RevisionNotFoundError:
        raise UserError(f'{repo_id} has no revision {revision!r}; give a branch, tag or '
                        'commit of it.') from None
    except hub_errors.EntryNotFoundError:
        raise UserError(f'{repo_id} has no {filename}: it is not a timm model repository '
                        'with safetensors weights.') from None


def _matches_its_hash(path: str) -> bool:
    """Whether a cached file's content matches the hash its blob is named by: the sha256
    of a large (LFS) file such as the weights."""
    blob = os.path.realpath(path)
    if os.path.basename(os.path.dirname(blob)) != 'blobs':  # a cache without symlinks
        return True
    digest = hashlib.sha256()
    with open(blob, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest() == os.path.basename(blob)
