"""Controllers: the control state, MIDI, OSC, schedules and mapping files."""
