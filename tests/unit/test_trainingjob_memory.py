"""What the TrainingJob controller remembers between reconciles: children seen in place, newest bodies."""

from __future__ import annotations

from tandem.api.trainingjob import TrainingJobSpec
from tandem.operator import kube
from tandem.operator.controller_common import BodyStore
from tandem.operator.trainingjob import builders
from tandem.operator.trainingjob.controller import SeenChildren


def test_a_child_created_or_found_is_not_created_again_until_its_owner_is_deleted() -> None:
    seen = SeenChildren()
    service = builders.head_service("gpt", "uid-1", "ml")
    account = builders.trainer_identity("gpt", "uid-1", "ml", attempt=1)[0]
    pod = builders.gang(
        TrainingJobSpec.model_validate(
            {"trainer": {"builtin": {"dataset": {"uri": "file:///d"}}}, "batch": {"perDevice": 4}}
        ),
        job="gpt",
        uid="uid-1",
        namespace="ml",
        attempt=1,
        image="img",
        resume_from=None,
    )[0]
    assert SeenChildren.key(pod) is None  # pods are watched, not remembered
    service_key, account_key = SeenChildren.key(service), SeenChildren.key(account)
    assert service_key == ("Service", "ml", "gpt-head", "uid-1")
    assert account_key == ("ServiceAccount", "ml", "gpt-trainer", "uid-1")

    role = builders.trainer_identity("gpt", "uid-1", "ml", attempt=1)[1]
    seen.note([service, account, role], [False, kube.Busy("429"), True])
    assert seen.has(service)  # a conflict: it is there
    assert not seen.has(account)  # busy: ask again next time
    assert seen.has(role)
    # The Role of the next attempt names another head pod: it is written again.
    assert not seen.has(builders.trainer_identity("gpt", "uid-1", "ml", attempt=2)[1])

    # A job of the same name made again has another uid: its Service is created anew.
    assert not seen.has(builders.head_service("gpt", "uid-2", "ml"))
    seen.forget_owner("uid-1")
    assert not seen.has(service)


def test_an_applied_child_is_written_again_only_when_its_content_changes() -> None:
    """The head's EndpointSlice follows the head pod: a new head (a restart) is a new write, the same
    head asked for on every reconcile is not."""
    seen = SeenChildren()
    first = builders.head_endpoints("gpt", "uid-1", "ml", "gpt-1-head", "10.0.0.5")
    seen.note([first], [True])
    assert seen.has(builders.head_endpoints("gpt", "uid-1", "ml", "gpt-1-head", "10.0.0.5"))
    assert not seen.has(builders.head_endpoints("gpt", "uid-1", "ml", "gpt-2-head", "10.0.0.9"))
    assert not seen.has(builders.head_endpoints("gpt", "uid-1", "ml", None, None))


def job_body(uid: str, version: str) -> dict[str, object]:
    return {"metadata": {"namespace": "ml", "name": "gpt", "uid": uid, "resourceVersion": version}}


def test_the_job_store_keeps_the_newest_body_and_says_what_is_news() -> None:
    """A watch event older than our own status write's reply must not undo it, and the watch's echo of
    that write must not wake the job again."""
    store = BodyStore("TrainingJob", "trainingjobs")
    assert store.put(job_body("a", "10"))  # first sight
    assert store.put(job_body("a", "12"))  # our status write's reply
    assert not store.put(job_body("a", "12"))  # the watch's echo of it
    assert not store.put(job_body("a", "11"))  # a late, older event
    assert store.get(("ml", "gpt")) == job_body("a", "12")
    assert store.put(job_body("b", "5"))  # deleted and made again: another object
