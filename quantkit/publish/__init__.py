"""Publishing: a work folder's `main` (measurement.json, README, recipe) and one branch per bitrate,
on the Hugging Face Hub or in a local git repository.

    publisher.py    the entry point: PublishOptions, choose_target, Publisher, publish_work
    engine.py       sync one branch in at most one commit, verify it, record it in WORK/state.json
    target.py       what the engine needs of a destination (Target, RemoteFile, RetryableError)
    hub_target.py   the Hub through the HfApi seam, and its pre-flight
    git_target.py   a local git repository
    background.py   `quantkit run`'s worker: branch N uploads while N+1 converts
"""

from quantkit.publish.background import BackgroundPublisher
from quantkit.publish.engine import SyncResult
from quantkit.publish.publisher import PublishOptions, Publisher, PublishReport, choose_target, publish_work

__all__ = ["BackgroundPublisher", "PublishOptions", "PublishReport", "Publisher", "SyncResult", "choose_target", "publish_work"]
