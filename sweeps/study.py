"""The Optuna study of an Optuna sweep, kept in Optuna's own journal storage: `<storage>/<name>/optuna.log`,
plain JSON lines (one per operation) that Optuna replays, and the file `optuna-dashboard` opens.

No serialised Python object is read: Tune's own searcher checkpoints (.pkl) are neither written nor read
(`sweeps.tuning.JournalSearch`); the journal is the whole state of the study. A resumed sweep
reopens it, so the study goes on from every trial it has seen; trials an interrupted run left
running are marked failed first. Optuna appends to the journal as trials start and end (a line
half-written by a crash is skipped when it is replayed).

A URI storage (s3://...) cannot be appended to: there the journal lives in the local cache
(`$LRSWEEP_CACHE/journals/`) and is copied whole to `<storage>/<name>/optuna.log` after every
finished trial (`Journal.publish`); a resume on any machine starts from that copy.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from compression.errors import UserInputError
from sweeps.storage import is_uri, read_file, write_file
from trainables.sources.packaged import cache_dir

JOURNAL_FILE = "optuna.log"

log = logging.getLogger("lrsweep")


def _replay(path: Path, where: str):
    """The JournalStorage of the journal file `path` (replayed: damage is found here)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except (ValueError, KeyError, TypeError, OSError) as e:  # a damaged line, or an operation that does not fit
        raise UserInputError(f"{where} is not a readable Optuna journal ({type(e).__name__}: {e}); move it "
                             f"away to start the study over") from None


class Journal:
    """The journal of the study of the sweep folder `directory` (see the module docstring)."""

    def __init__(self, directory: str, study_name: str) -> None:
        self.directory, self.study_name = directory, study_name
        if is_uri(directory):
            digest = hashlib.sha256(directory.encode()).hexdigest()[:16]
            self.path = cache_dir() / "journals" / f"{digest}.log"
        else:
            self.path = Path(directory) / JOURNAL_FILE
        self.storage = None

    @property
    def where(self) -> str:
        return f"{self.directory.rstrip('/')}/{JOURNAL_FILE}"

    def open(self, fresh: bool) -> Journal:
        """Open the journal: `fresh` starts the study over (a sweep run again without resuming);
        otherwise the study goes on, its trials left running by an interrupted run marked failed."""
        import optuna
        from optuna.trial import TrialState

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if is_uri(self.directory):
            stored = None if fresh else read_file(self.directory, JOURNAL_FILE)
            if stored is not None:
                write_file(str(self.path.parent), self.path.name, stored)
            elif self.path.exists():
                self.path.unlink()  # a local copy the storage does not hold (any more)
        self.storage = _replay(self.path, self.where)
        names = {s.study_name for s in self.storage.get_all_studies()}
        if self.study_name not in names:
            return self
        if fresh:
            optuna.delete_study(study_name=self.study_name, storage=self.storage)
            return self
        study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        left = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        for trial in left:
            study.tell(trial.number, state=TrialState.FAIL)
        done = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
        log.info(f"resume: the Optuna study goes on from its journal {self.where} ({done} finished trial(s)"
                 + (f"; {len(left)} interrupted trial(s) marked failed" if left else "") + ")")
        return self

    def trials(self) -> int:
        """How many trials the study holds (0 before it is created)."""
        try:
            study_id = self.storage.get_study_id_from_name(self.study_name)
        except KeyError:
            return 0
        return len(self.storage.get_all_trials(study_id, deepcopy=False))

    def publish(self) -> None:
        """Copy the local journal to a URI storage (nothing to do for a local one)."""
        if is_uri(self.directory) and self.path.is_file():
            write_file(self.directory, JOURNAL_FILE, self.path.read_bytes())


def read_study(directory: str):
    """The Optuna study stored in the sweep folder `directory` (a local folder or a URI), read from a
    copy of its journal (nothing is written to the folder); None when it has none. UserInputError
    when the journal is damaged."""
    import optuna

    data = read_file(directory, JOURNAL_FILE)
    if data is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / JOURNAL_FILE
        copy.write_bytes(data)
        storage = _replay(copy, f"{directory.rstrip('/')}/{JOURNAL_FILE}")
        studies = storage.get_all_studies()
        if not studies:
            return None
        name = studies[-1].study_name
        memory = optuna.storages.InMemoryStorage()  # the study outlives its temporary copy
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "a new study created in memory"
        try:
            optuna.copy_study(from_study_name=name, from_storage=storage, to_storage=memory)
        finally:
            optuna.logging.set_verbosity(verbosity)
    return optuna.load_study(study_name=name, storage=memory)
