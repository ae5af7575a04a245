-- Version 21: how many times an operator lifted each destination's pause or slow-down (queue
-- flush, the dashboard's Lift). A worker that defers a delivery for a destination says which of
-- its lifts it knew of: one recorded since means the worker decided on a pause the operator had
-- already ended, and the delivery is made due instead of pushed to the end of that pause. A
-- worker's record of a pause or rate is likewise ignored when a lift it has not heard of is
-- recorded (it would undo the lift).
ALTER TABLE destination_state ADD COLUMN lifts INTEGER NOT NULL DEFAULT 0;
