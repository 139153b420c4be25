-- The claim's queue in lanes: `work_units_dispatch` leads with `id % 16` (the server's
-- `store::DISPATCH_LANES`), so each claim walks its own lane in id order from a random start.
-- With one order for everybody, every concurrent claim began at the head of the queue and ran
-- its checks on the units the others had just locked (about 500 per claim with 1,000 workers)
-- before `SKIP LOCKED` passed them by.
DROP INDEX work_units_dispatch;
CREATE INDEX work_units_dispatch ON work_units ((id % 16), id) WHERE state = 'pending' AND unsent > 0;
