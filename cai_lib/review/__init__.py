"""People in the loop: the review queue, verdicts as `review_events`, and the review web app."""
