//! Membership by SWIM gossip (foca) over pier's UDP peer socket.
