"""A job submitted before any worker published its image waits in the queue, then runs on the first image
a worker publishes: a newcomer's demo job is not refused while the image is still being built."""

from __future__ import annotations

from helpers import auth
from jobworld import JobWorld
from sqlalchemy import delete, select

from sandbox.store.models import AuditEvent, ImageRecord


def test_a_job_waits_for_its_image_and_is_pinned_to_the_published_one(job_world: JobWorld) -> None:
    with job_world.instance.sessions() as session:
        published = session.get(ImageRecord, "analysis")
        assert published is not None
        image_id = published.image_id
        session.execute(delete(ImageRecord).where(ImageRecord.name == "analysis"))
        session.commit()

    created = job_world.submit({"main.py": "print('hello')\n"}, ["python3", "main.py"])
    assert created["state"] == "queued" and created["image_id"] == ""
    view = job_world.api.get(f"/v1/jobs/{created['id']}", headers=auth(job_world.buyer)).json()
    assert "waiting for the workers to publish image 'analysis'" in view["reason"]

    job_world.worker.admit()  # nothing published yet: the job stays queued, nothing starts
    assert job_world.job(created["id"])["state"] == "queued"
    assert not job_world.containers()

    job_world.worker.refresh_images()
    job = job_world.run_until(created["id"], {"in_review", "done"})
    assert job["image_id"] == image_id and job["reason"] != view["reason"]
    with job_world.instance.sessions() as session:
        pins = session.execute(select(AuditEvent).where(AuditEvent.action == "job.image.pin",
                                                        AuditEvent.object_id == created["id"])).scalars().all()
    assert [event.details["image_id"] for event in pins] == [image_id]
