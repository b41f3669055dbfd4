"""Introspection XML for the BlueZ interfaces the simulator serves.

bless (dbus-next) builds its proxies from this XML, so the method and property
signatures must match BlueZ's ``doc/org.bluez.*.rst`` exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

_STANDARD = {
    "org.freedesktop.DBus.Introspectable": """
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect"><arg name="xml" type="s" direction="out"/></method>
  </interface>""",
    "org.freedesktop.DBus.Properties": """
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg name="interface" type="s" direction="in"/>
      <arg name="name" type="s" direction="in"/>
      <arg name="value" type="v" direction="out"/>
    </method>
    <method name="Set">
      <arg name="interface" type="s" direction="in"/>
      <arg name="name" type="s" direction="in"/>
      <arg name="value" type="v" direction="in"/>
    </method>
    <method name="GetAll">
      <arg name="interface" type="s" direction="in"/>
      <arg name="properties" type="a{sv}" direction="out"/>
    </method>
    <signal name="PropertiesChanged">
      <arg name="interface" type="s"/>
      <arg name="changed_properties" type="a{sv}"/>
      <arg name="invalidated_properties" type="as"/>
    </signal>
  </interface>""",
    "org.freedesktop.DBus.ObjectManager": """
  <interface name="org.freedesktop.DBus.ObjectManager">
    <method name="GetManagedObjects">
      <arg name="objects" type="a{oa{sa{sv}}}" direction="out"/>
    </method>
    <signal name="InterfacesAdded">
      <arg name="object" type="o"/>
      <arg name="interfaces" type="a{sa{sv}}"/>
    </signal>
    <signal name="InterfacesRemoved">
      <arg name="object" type="o"/>
      <arg name="interfaces" type="as"/>
    </signal>
  </interface>""",
}

_BLUEZ = {
    "org.bluez.AgentManager1": """
  <interface name="org.bluez.AgentManager1">
    <method name="RegisterAgent">
      <arg name="agent" type="o" direction="in"/><arg name="capability" type="s" direction="in"/>
    </method>
    <method name="UnregisterAgent"><arg name="agent" type="o" direction="in"/></method>
    <method name="RequestDefaultAgent"><arg name="agent" type="o" direction="in"/></method>
  </interface>""",
    "org.bluez.Adapter1": """
  <interface name="org.bluez.Adapter1">
    <method name="StartDiscovery"/>
    <method name="SetDiscoveryFilter"><arg name="properties" type="a{sv}" direction="in"/></method>
    <method name="StopDiscovery"/>
    <method name="RemoveDevice"><arg name="device" type="o" direction="in"/></method>
    <method name="GetDiscoveryFilters"><arg name="filters" type="as" direction="out"/></method>
    <property name="Address" type="s" access="read"/>
    <property name="AddressType" type="s" access="read"/>
    <property name="Name" type="s" access="read"/>
    <property name="Alias" type="s" access="readwrite"/>
    <property name="Class" type="u" access="read"/>
    <property name="Powered" type="b" access="readwrite"/>
    <property name="PowerState" type="s" access="read"/>
    <property name="Discoverable" type="b" access="readwrite"/>
    <property name="DiscoverableTimeout" type="u" access="readwrite"/>
    <property name="Pairable" type="b" access="readwrite"/>
    <property name="PairableTimeout" type="u" access="readwrite"/>
    <property name="Discovering" type="b" access="read"/>
    <property name="UUIDs" type="as" access="read"/>
    <property name="Modalias" type="s" access="read"/>
    <property name="Roles" type="as" access="read"/>
  </interface>""",
    "org.bluez.GattManager1": """
  <interface name="org.bluez.GattManager1">
    <method name="RegisterApplication">
      <arg name="application" type="o" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
    </method>
    <method name="UnregisterApplication"><arg name="application" type="o" direction="in"/></method>
  </interface>""",
    "org.bluez.LEAdvertisingManager1": """
  <interface name="org.bluez.LEAdvertisingManager1">
    <method name="RegisterAdvertisement">
      <arg name="advertisement" type="o" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
    </method>
    <method name="UnregisterAdvertisement">
      <arg name="service" type="o" direction="in"/>
    </method>
    <property name="ActiveInstances" type="y" access="read"/>
    <property name="SupportedInstances" type="y" access="read"/>
    <property name="SupportedIncludes" type="as" access="read"/>
    <property name="SupportedSecondaryChannels" type="as" access="read"/>
  </interface>""",
    "org.bluez.Device1": """
  <interface name="org.bluez.Device1">
    <method name="Disconnect"/>
    <method name="Connect"/>
    <method name="ConnectProfile"><arg name="UUID" type="s" direction="in"/></method>
    <method name="DisconnectProfile"><arg name="UUID" type="s" direction="in"/></method>
    <method name="Pair"/>
    <method name="CancelPairing"/>
    <property name="Address" type="s" access="read"/>
    <property name="AddressType" type="s" access="read"/>
    <property name="Name" type="s" access="read"/>
    <property name="Alias" type="s" access="readwrite"/>
    <property name="Paired" type="b" access="read"/>
    <property name="Bonded" type="b" access="read"/>
    <property name="Trusted" type="b" access="readwrite"/>
    <property name="Blocked" type="b" access="readwrite"/>
    <property name="LegacyPairing" type="b" access="read"/>
    <property name="RSSI" type="n" access="read"/>
    <property name="Connected" type="b" access="read"/>
    <property name="UUIDs" type="as" access="read"/>
    <property name="Adapter" type="o" access="read"/>
    <property name="ManufacturerData" type="a{qv}" access="read"/>
    <property name="ServiceData" type="a{sv}" access="read"/>
    <property name="ServicesResolved" type="b" access="read"/>
    <property name="AdvertisingFlags" type="ay" access="read"/>
  </interface>""",
    "org.bluez.GattService1": """
  <interface name="org.bluez.GattService1">
    <property name="UUID" type="s" access="read"/>
    <property name="Device" type="o" access="read"/>
    <property name="Primary" type="b" access="read"/>
    <property name="Includes" type="ao" access="read"/>
  </interface>""",
    "org.bluez.GattCharacteristic1": """
  <interface name="org.bluez.GattCharacteristic1">
    <method name="ReadValue">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="value" type="ay" direction="out"/>
    </method>
    <method name="WriteValue">
      <arg name="value" type="ay" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
    </method>
    <method name="AcquireWrite">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="fd" type="h" direction="out"/>
      <arg name="mtu" type="q" direction="out"/>
    </method>
    <method name="AcquireNotify">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="fd" type="h" direction="out"/>
      <arg name="mtu" type="q" direction="out"/>
    </method>
    <method name="StartNotify"/>
    <method name="StopNotify"/>
    <property name="UUID" type="s" access="read"/>
    <property name="Service" type="o" access="read"/>
    <property name="Value" type="ay" access="read"/>
    <property name="Notifying" type="b" access="read"/>
    <property name="Flags" type="as" access="read"/>
    <property name="WriteAcquired" type="b" access="read"/>
    <property name="NotifyAcquired" type="b" access="read"/>
    <property name="MTU" type="q" access="read"/>
  </interface>""",
    "org.bluez.GattDescriptor1": """
  <interface name="org.bluez.GattDescriptor1">
    <method name="ReadValue">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="value" type="ay" direction="out"/>
    </method>
    <method name="WriteValue">
      <arg name="value" type="ay" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
    </method>
    <property name="UUID" type="s" access="read"/>
    <property name="Characteristic" type="o" access="read"/>
    <property name="Value" type="ay" access="read"/>
  </interface>""",
    "org.doorstep.Sim1": """
  <interface name="org.doorstep.Sim1">
    <method name="Reset"/>
    <method name="GetEnvironment"><arg name="env" type="a{ss}" direction="out"/></method>
    <method name="ListPeripherals"><arg name="peripherals" type="a(ss)" direction="out"/></method>
    <method name="RefuseConnect">
      <arg name="target" type="s" direction="in"/><arg name="times" type="u" direction="in"/>
    </method>
    <method name="DelayConnect">
      <arg name="target" type="s" direction="in"/><arg name="seconds" type="d" direction="in"/>
    </method>
    <method name="DropLink">
      <arg name="target" type="s" direction="in"/><arg name="when" type="s" direction="in"/>
    </method>
    <method name="AttErrorNext">
      <arg name="target" type="s" direction="in"/><arg name="code" type="y" direction="in"/>
    </method>
    <method name="LoseNotifications">
      <arg name="target" type="s" direction="in"/><arg name="count" type="u" direction="in"/>
    </method>
    <method name="SetRssi">
      <arg name="target" type="s" direction="in"/><arg name="rssi" type="n" direction="in"/>
    </method>
    <method name="SetInRange">
      <arg name="target" type="s" direction="in"/><arg name="in_range" type="b" direction="in"/>
    </method>
    <method name="SupervisionTimeout"><arg name="target" type="s" direction="in"/></method>
    <method name="SetTiming">
      <arg name="enabled" type="b" direction="in"/>
      <arg name="interval_ms" type="d" direction="in"/>
      <arg name="adv_interval_ms" type="d" direction="in"/>
    </method>
  </interface>""",
}

INTERFACES: dict[str, str] = {**_STANDARD, **_BLUEZ}

_DOCTYPE = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
)


def node_xml(interfaces: Iterable[str], children: Iterable[str]) -> str:
    """Introspection document for one object path."""
    parts = [_DOCTYPE, "<node>"]
    parts.append(_STANDARD["org.freedesktop.DBus.Introspectable"])
    seen = {"org.freedesktop.DBus.Introspectable"}
    for name in ["org.freedesktop.DBus.Properties", *interfaces]:
        if name in seen or name not in INTERFACES:
            continue
        seen.add(name)
        parts.append(INTERFACES[name])
    for child in sorted(set(children)):
        parts.append(f'\n  <node name="{child}"/>')
    parts.append("\n</node>\n")
    return "".join(parts)
