"""Live vector management: files named inside the vectors directory, uploads, unload, rescan.

Every file goes through the start-up checks (a readable GGUF control vector without NaN or Inf,
n_embd and layers fitting the model) before it enters the registry. Uploads are validated from a
scratch copy outside the directory and only then written into it atomically, so a refused upload
leaves the directory as it was and an accepted one is there after a restart. Paths given by
clients resolve inside the directory (symlinks included) or are refused.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ggsteer.atomic_file import write_atomically
from ggsteer.serve.defaults import DefaultSteering
from ggsteer.serve.errors import ApiError
from ggsteer.serve.registry import RegisteredVector, VectorRegistry
from ggsteer.vectors import ControlVector

VECTOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_PATH_CHARS = 255  # a client's path inside the directory; longer ones are refused before the file system sees them


def short(text: str) -> str:
    """A client's string as it may appear in an error message (quoted, escaped, cut)."""
    quoted = ascii(text)
    return quoted if len(quoted) <= 80 else f"{quoted[:72]}...' ({len(text)} characters)"


class VectorStore:
    def __init__(self, registry: VectorRegistry, model, defaults: DefaultSteering, max_upload_bytes: int):
        if registry.directory is None:
            raise ValueError("live vector management needs a registry loaded from a directory")
        self.registry = registry
        self.model = model
        self.defaults = defaults
        self.max_upload_bytes = max_upload_bytes
        self.directory = registry.directory.resolve()

    # -- names and paths ----------------------------------------------------------------------
    def check_name(self, name: str) -> str:
        if not VECTOR_NAME.fullmatch(name) or name.endswith(".gguf"):
            raise ApiError(400, f"bad vector name {name!r}: use letters, digits, '.', '_' and '-' "
                                "(up to 64, without .gguf)", "name")
        return name

    def resolve(self, path_text) -> Path:
        """A client's path (relative to the directory, or absolute) as a *.gguf file inside it."""
        if not isinstance(path_text, str) or not path_text or "\0" in path_text or len(path_text) > MAX_PATH_CHARS:
            raise ApiError(400, f"path must be a non-empty string of at most {MAX_PATH_CHARS} characters naming "
                                "a file in the vectors directory", "path")
        try:
            candidate = (self.directory / path_text).resolve()
            inside = candidate.is_relative_to(self.directory)
            is_file = inside and candidate.suffix == ".gguf" and candidate.is_file()
        except (OSError, RuntimeError, UnicodeError) as error:  # too long a name, a symlink loop, a lone surrogate
            raise ApiError(400, f"path {short(path_text)}: cannot be resolved ({type(error).__name__})",
                           "path") from None
        if not inside:
            raise ApiError(400, f"path {short(path_text)} is outside the vectors directory; only files inside it "
                                "can be loaded", "path")
        if not is_file:
            raise ApiError(400, f"path {short(path_text)}: no *.gguf file there in the vectors directory", "path")
        return candidate

    # -- validation ------------------------------------------------------------------------------
    def validated(self, path: Path, label: str) -> ControlVector:
        try:
            vector = ControlVector.load(path)
            vector.check_model(self.model)
        except Exception as error:  # noqa: BLE001 - any unreadable or unfit file is the client's 400
            # the client knows the file by its name, not by the server's paths
            raise ApiError(400, f"{label}: {str(error).replace(str(path), path.name)}") from None
        return vector

    # -- operations ----------------------------------------------------------------------------
    def load_file(self, path_text) -> RegisteredVector:
        """Register a file inside the directory under its stem (again, if it is already there)."""
        path = self.resolve(path_text)
        name = self.check_name(path.stem)
        known = self.registry.vectors.get(name)
        if known is not None and known.path.resolve() != path:
            raise ApiError(409, f"a different file is already loaded as {name!r} ({known.path.name})", "path")
        entry = RegisteredVector(name, path, self.validated(path, path.name))
        self.registry.put(entry)
        return entry

    def upload(self, name: str, data: bytes, overwrite: bool) -> RegisteredVector:
        """Validate GGUF bytes, write them as <directory>/<name>.gguf atomically and register them."""
        self.check_name(name)
        if len(data) > self.max_upload_bytes:
            raise ApiError(400, f"vector file is larger than {self.max_upload_bytes} bytes", "file")
        target = self.directory / f"{name}.gguf"
        if not overwrite and (os.path.lexists(target) or name in self.registry.vectors):
            raise ApiError(409, f"vector {name!r} exists: send ?overwrite=true to replace it", "name")
        with tempfile.TemporaryDirectory(prefix="ggsteer-upload-") as scratch:
            copy = Path(scratch) / f"{name}.gguf"
            copy.write_bytes(data)
            vector = self.validated(copy, f"uploaded vector {name!r}")
            try:
                write_atomically(target, lambda temp: shutil.copyfile(copy, temp), overwrite=overwrite,
                                 what="vector file")
            except FileExistsError:
                raise ApiError(409, f"vector {name!r} exists: send ?overwrite=true to replace it", "name") from None
        entry = RegisteredVector(name, target, vector)
        self.registry.put(entry)
        self.defaults.revalidate()  # an overwritten file may lack layers the default named
        return entry

    def unload(self, name: str) -> RegisteredVector:
        """Take a vector out of the registry and the default steering; its file stays."""
        entry = self.registry.remove(name)
        self.defaults.forget(name)
        return entry

    def rescan(self) -> dict:
        """Re-read every *.gguf in the directory: new and changed files in, vanished ones out.

        The rule of `load` holds for each file: it must resolve to a file inside the directory
        (symlinks included). A link to a file already taken is an alias, not a second vector:
        plain files are read first, so the file's own name wins over a link's.
        """
        before = self.registry.vectors
        # files loaded from subfolders stay while they exist
        kept = {name: e for name, e in before.items() if e.path.parent.resolve() != self.directory and e.path.is_file()}
        taken = {e.path.resolve(): name for name, e in kept.items()}
        found, errors = {}, []
        for path in sorted(self.directory.glob("*.gguf"), key=lambda p: (p.is_symlink(), p.name)):
            try:
                target = self.scanned_target(path)
                if target in taken:
                    raise ApiError(400, f"{path.name}: an alias of {taken[target]!r} (the same file), not loaded twice")
                name = self.check_name(path.stem)
                found[name] = RegisteredVector(name, path, self.validated(path, path.name))
                taken[target] = name
            except ApiError as error:
                errors.append({"file": path.name, "error": error.message})
        table = {**kept, **found}
        for name in before:
            if name not in table:
                self.registry.remove(name)
                self.defaults.forget(name)
        for entry in table.values():
            self.registry.put(entry)
        self.defaults.revalidate()
        return {"added": sorted(set(table) - set(before)), "removed": sorted(set(before) - set(table)),
                "errors": errors, "vectors": sorted(table)}

    def scanned_target(self, path: Path) -> Path:
        """Where a directory entry leads: a file inside the directory, or ApiError(400)."""
        try:
            target = path.resolve(strict=True)
            is_file = target.is_file()
        except (OSError, RuntimeError) as error:  # a dangling link, a symlink loop
            raise ApiError(400, f"{path.name}: cannot be resolved ({type(error).__name__})") from None
        if not target.is_relative_to(self.directory):
            raise ApiError(400, f"{path.name} leads outside the vectors directory; only files inside it can be loaded")
        if not is_file:
            raise ApiError(400, f"{path.name} is not a file")
        return target
