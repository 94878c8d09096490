"""ReviewService: thin handlers over ``kernel.review.ReviewQueue`` (see ``rpc.py`` for the calling convention).

An open WatchReviews counts against the kernel's watch budget (``watch_budget.py``) until it ends.
"""

from __future__ import annotations

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from .watch_budget import UNLIMITED, follow

SERVICE = "ReviewService"


def review_handlers(queue, watches=None) -> dict:
    """``{(service, method): handler}`` for ``kernel_services.generic_handlers(implemented=...)``;
    ``watches`` (a ``WatchBudget``, shared with the other watch RPCs) caps open WatchReviews calls."""
    watches = watches or UNLIMITED

    def list_reviews(request: kpb.ListReviewsRequest, ctx) -> kpb.ListReviewsResponse:
        return queue.list(request.pipeline, request.tenant, request.state, request.page_size, request.page_token)

    def get_review(request: kpb.ReviewRef, ctx) -> kpb.Review:
        return queue.get(request.review_id)

    def claim_review(request: kpb.ClaimReviewRequest, ctx) -> kpb.Review:
        return queue.claim(request.review_id, request.reviewer, request.lease_seconds)

    def claim_next_review(request: kpb.ClaimNextReviewRequest, ctx) -> kpb.Review:
        return queue.claim_next(request.reviewer, request.lease_seconds, request.pipeline, request.tenant)

    def resolve_review(request: kpb.ResolveReviewRequest, ctx) -> kpb.Review:
        return queue.resolve(request.review_id, request.reviewer, request.action, request.comment)

    def watch_reviews(request: kpb.WatchReviewsRequest, ctx):
        return follow(watches, "WatchReviews",
                      lambda: queue.watch(request.pipeline, request.tenant, request.include_open, request.updates,
                                          from_sequence=request.from_sequence), ctx)

    return {
        (SERVICE, "ListReviews"): list_reviews,
        (SERVICE, "GetReview"): get_review,
        (SERVICE, "ClaimReview"): claim_review,
        (SERVICE, "ClaimNextReview"): claim_next_review,
        (SERVICE, "ResolveReview"): resolve_review,
        (SERVICE, "WatchReviews"): watch_reviews,
    }
