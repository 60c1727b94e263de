-- Which coordinator holds an agent's session (a number each coordinator
-- process draws at start), so that `agent list` through any coordinator
-- shows the agents in session with any other. Set at Hello, cleared at
-- the session's end only by its holder (a newer session elsewhere wins);
-- a holder that died leaves it set, and readers believe it only while
-- the agent was seen recently.
ALTER TABLE sundial_agents ADD COLUMN session_holder bigint;
