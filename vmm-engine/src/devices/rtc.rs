//! MC146818 CMOS RTC and NVRAM at ports 0x70 (index) / 0x71 (data), as a
//! PC's: the clock shows the host's time (UTC, or the local time of the
//! process that runs the VM; bhyve's `-u`), the century is at index 0x32 as
//! the FADT says, and the memory-size bytes firmware reads are filled in.
//! Without it Linux polls "update in progress" 10,000 times on an all-ones
//! port and gives up on /dev/rtc0.
//!
//! The guest may set the clock (SET bit in register B): the difference to
//! the host's time is kept as an offset. Periodic, alarm and update
//! interrupts are not generated (register C reads 0).

use std::time::{SystemTime, UNIX_EPOCH};

pub const RTC_INDEX: u16 = 0x70;
pub const RTC_DATA: u16 = 0x71;
/// CMOS index of the century byte (the FADT's CENTURY field).
pub const CENTURY: u8 = 0x32;

const SEC: usize = 0x00;
const MIN: usize = 0x02;
const HOUR: usize = 0x04;
const WDAY: usize = 0x06;
const MDAY: usize = 0x07;
const MON: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;

const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
/// Register D: valid RAM and time (battery good).
const D_VRT: u8 = 0x80;
/// Register A: 32.768 kHz time base, 1024 Hz rate selection.
const A_DEFAULT: u8 = 0x26;

pub struct Rtc {
    index: u8,
    cmos: [u8; 128],
    utc: bool,
    /// Guest time minus host time, seconds (the guest set the clock).
    offset: i64,
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0xf)
}

/// The low byte of a broken-down time field. Fields are in range (seconds,
/// minutes, ..., a two-digit year or century); a year beyond them wraps, as
/// the `as u8` casts this replaces did.
fn low_byte(v: libc::c_int) -> u8 {
    v.to_le_bytes()[0]
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Broken-down time of `t`: UTC, or the process's local time zone.
fn broken_down(t: i64, utc: bool) -> libc::tm {
    // SAFETY: an all-zero tm is a valid value; gmtime_r/localtime_r fill it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let t = t as libc::time_t;
    // SAFETY: both pointers are valid for the call; the _r variants are thread-safe.
    unsafe {
        if utc {
            libc::gmtime_r(&t, &mut tm);
        } else {
            libc::localtime_r(&t, &mut tm);
        }
    }
    tm
}

/// Seconds since the epoch of a broken-down time (UTC or local).
fn to_epoch(mut tm: libc::tm, utc: bool) -> i64 {
    tm.tm_isdst = -1;
    // SAFETY: tm is a valid, owned struct.
    (unsafe {
        if utc {
            libc::timegm(&mut tm)
        } else {
            libc::mktime(&mut tm)
        }
    }) as i64
}

impl Rtc {
    /// `low`: RAM below the PCI hole, `high`: RAM above 4 GiB (bytes).
    pub fn new(utc: bool, low: u64, high: u64) -> Rtc {
        let mut cmos = [0u8; 128];
        cmos[REG_A] = A_DEFAULT;
        cmos[REG_B] = B_24H;
        cmos[REG_D] = D_VRT;
        let mut put16 = |at: usize, v: u64| {
            let v = v.min(0xffff) as u16;
            cmos[at..at + 2].copy_from_slice(&v.to_le_bytes());
        };
        // Base memory (KiB), memory 1..64 MiB (KiB), 16 MiB..4 GiB in 64 KiB
        // units: what a PC BIOS leaves for the OS and loaders.
        put16(0x15, 640);
        let ext_kib = low.saturating_sub(1 << 20) >> 10;
        put16(0x17, ext_kib);
        put16(0x30, ext_kib);
        put16(0x34, low.saturating_sub(16 << 20) >> 16);
        let hi = (high >> 16).min(0xff_ffff) as u32;
        cmos[0x5b..0x5e].copy_from_slice(&hi.to_le_bytes()[..3]);
        Rtc {
            index: 0,
            cmos,
            utc,
            offset: 0,
        }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.cmos[REG_B] & B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.cmos[REG_B] & B_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    /// Put the guest's current time into the clock registers.
    fn latch_time(&mut self) {
        let tm = broken_down(now() + self.offset, self.utc);
        let hour = low_byte(tm.tm_hour);
        let year = tm.tm_year + 1900;
        self.cmos[SEC] = self.encode(low_byte(tm.tm_sec.min(59)));
        self.cmos[MIN] = self.encode(low_byte(tm.tm_min));
        self.cmos[HOUR] = if self.cmos[REG_B] & B_24H != 0 {
            self.encode(hour)
        } else {
            // 12-hour mode: 12, 1..11, with bit 7 for PM.
            let h12 = match hour % 12 {
                0 => 12,
                h => h,
            };
            self.encode(h12) | if hour >= 12 { 0x80 } else { 0 }
        };
        self.cmos[WDAY] = self.encode(low_byte(tm.tm_wday) + 1);
        self.cmos[MDAY] = self.encode(low_byte(tm.tm_mday));
        self.cmos[MON] = self.encode(low_byte(tm.tm_mon) + 1);
        self.cmos[YEAR] = self.encode(low_byte(year % 100));
        self.cmos[CENTURY as usize] = self.encode(low_byte(year / 100));
    }

    /// The guest finished setting the clock: keep the difference to the host.
    fn commit_time(&mut self) {
        // SAFETY: an all-zero tm is valid; the fields are set below.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let hour = self.cmos[HOUR];
        let h = if self.cmos[REG_B] & B_24H != 0 {
            self.decode(hour)
        } else {
            let h = self.decode(hour & 0x7f) % 12;
            h + if hour & 0x80 != 0 { 12 } else { 0 }
        };
        tm.tm_sec = i32::from(self.decode(self.cmos[SEC]));
        tm.tm_min = i32::from(self.decode(self.cmos[MIN]));
        tm.tm_hour = i32::from(h);
        tm.tm_mday = i32::from(self.decode(self.cmos[MDAY]));
        tm.tm_mon = i32::from(self.decode(self.cmos[MON])) - 1;
        let year = i32::from(self.decode(self.cmos[CENTURY as usize])) * 100
            + i32::from(self.decode(self.cmos[YEAR]));
        tm.tm_year = year - 1900;
        let t = to_epoch(tm, self.utc);
        if t != -1 {
            self.offset = t - now();
        }
    }

    /// Read one byte at `port` (0x70 or 0x71).
    pub fn read(&mut self, port: u16) -> u8 {
        if port != RTC_DATA {
            return 0xff; // the index register is write-only
        }
        let i = usize::from(self.index);
        match i {
            SEC | MIN | HOUR | WDAY | MDAY | MON | YEAR if self.cmos[REG_B] & B_SET == 0 => {
                self.latch_time();
                self.cmos[i]
            }
            i if i == CENTURY as usize && self.cmos[REG_B] & B_SET == 0 => {
                self.latch_time();
                self.cmos[i]
            }
            // No update is ever in progress: reads of the time are atomic here.
            REG_A => self.cmos[REG_A] & 0x7f,
            // Interrupt flags: none are raised, reading clears them.
            REG_C => 0,
            REG_D => D_VRT,
            _ => self.cmos[i],
        }
    }

    /// Write one byte to `port` (0x70 or 0x71).
    pub fn write(&mut self, port: u16, v: u8) {
        if port == RTC_INDEX {
            // Bit 7 masks NMIs on a PC; nothing to mask here.
            self.index = v & 0x7f;
            return;
        }
        let i = usize::from(self.index);
        match i {
            REG_A => self.cmos[REG_A] = v & 0x7f,
            REG_B => {
                let was_set = self.cmos[REG_B] & B_SET != 0;
                if v & B_SET != 0 && !was_set {
                    // Freeze the registers at the current time for the guest to edit.
                    self.latch_time();
                }
                self.cmos[REG_B] = v;
                if was_set && v & B_SET == 0 {
                    self.commit_time();
                }
            }
            REG_C | REG_D => {}
            _ => self.cmos[i] = v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(r: &mut Rtc, idx: u8) -> u8 {
        r.write(RTC_INDEX, idx);
        r.read(RTC_DATA)
    }

    fn rtc_time(r: &mut Rtc) -> i64 {
        // SAFETY: zeroed tm, filled below.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        tm.tm_sec = i32::from(from_bcd(read(r, 0)));
        tm.tm_min = i32::from(from_bcd(read(r, 2)));
        tm.tm_hour = i32::from(from_bcd(read(r, 4)));
        tm.tm_mday = i32::from(from_bcd(read(r, 7)));
        tm.tm_mon = i32::from(from_bcd(read(r, 8))) - 1;
        tm.tm_year =
            i32::from(from_bcd(read(r, 0x32))) * 100 + i32::from(from_bcd(read(r, 9))) - 1900;
        to_epoch(tm, true)
    }

    #[test]
    fn utc_clock_is_the_hosts() {
        let mut r = Rtc::new(true, 512 << 20, 0);
        assert_eq!(read(&mut r, 0x0d), 0x80, "valid RAM and time");
        assert_eq!(read(&mut r, 0x0a) & 0x80, 0, "never update-in-progress");
        let d = rtc_time(&mut r) - now();
        assert!(d.abs() <= 2, "RTC {d} s off the host");
    }

    #[test]
    fn guest_sets_the_clock() {
        let mut r = Rtc::new(true, 512 << 20, 0);
        r.write(RTC_INDEX, 0x0b);
        r.write(RTC_DATA, B_SET | B_24H);
        // 2001-02-03 04:05:06 UTC.
        for (i, v) in [(0, 6), (2, 5), (4, 4), (7, 3), (8, 2), (9, 1), (0x32, 20)] {
            r.write(RTC_INDEX, i);
            r.write(RTC_DATA, to_bcd(v));
        }
        r.write(RTC_INDEX, 0x0b);
        r.write(RTC_DATA, B_24H);
        let d = rtc_time(&mut r) - 981_173_106;
        assert!(d.abs() <= 2, "{d}");
    }

    #[test]
    fn binary_mode_and_memory_size() {
        let mut r = Rtc::new(true, 3 << 30, 1 << 30);
        r.write(RTC_INDEX, 0x0b);
        r.write(RTC_DATA, B_24H | B_BINARY);
        assert!(read(&mut r, 0) < 60);
        assert_eq!(read(&mut r, 0x15), (640 & 0xff) as u8);
        let above16 = u16::from_le_bytes([read(&mut r, 0x34), read(&mut r, 0x35)]);
        assert_eq!(u64::from(above16), ((3u64 << 30) - (16 << 20)) >> 16);
        let hi = u32::from_le_bytes([
            read(&mut r, 0x5b),
            read(&mut r, 0x5c),
            read(&mut r, 0x5d),
            0,
        ]);
        assert_eq!(u64::from(hi), (1u64 << 30) >> 16);
        // Index port reads ones; out-of-range indexes wrap to the 128-byte bank.
        assert_eq!(r.read(RTC_INDEX), 0xff);
        r.write(RTC_INDEX, 0xff);
        r.write(RTC_DATA, 0x5a);
        assert_eq!(read(&mut r, 0x7f), 0x5a);
    }
}
